"""What every benchmark shares: the device key its results are filed under, the timers, peak
memory, and the JSON writer of ``bench/results/``.

Results files are JSON objects keyed by device (``device_key``), each holding the entries of
that device by name; writing an entry keeps every other device's and entry's results, so one
file collects the CPU runs of this machine and the GPU runs of a lent one side by side. Timers
return the median of repeated rounds after warm-up (these machines are noisy; benchmarks time
the same thing twice and say so when two runs disagree).
"""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "device_key", "machine", "cpu_seconds", "cuda_ms", "cuda_peak_bytes",
           "save_result", "load_results", "ForceLength"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_key(device: str | torch.device) -> str:
    """"nvidia-h100-80gb-hbm3" for a GPU, "cpu-<model>" for the CPU: the results files' keys."""
    if torch.device(device).type == "cuda":
        return _slug(torch.cuda.get_device_name(torch.device(device)))
    return "cpu-" + (_slug(_cpu_model()) or "unknown")


def machine(device: str | torch.device) -> dict:
    """Versions and sizes that a result depends on, stored with every entry."""
    info = {"device_key": device_key(device), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu": _cpu_model(), "date": time.strftime("%Y-%m-%d")}
    if torch.device(device).type == "cuda":
        info["device"] = torch.cuda.get_device_name(torch.device(device))
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def cpu_seconds(fn: Callable[[], object], rounds: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``rounds`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def cuda_ms(fn: Callable[[], object], rounds: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory ``fn()`` allocates above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class ForceLength:
    """A logits processor (for transformers' ``LogitsProcessorList``, first in the list) that
    fixes each row's generation length: row r may not stop before ``lengths[r]`` new tokens and
    must stop at it (every stop token banned before, only the first one allowed then). Benchmarks
    with random-weight models use it, which never end a sequence by themselves."""

    def __init__(self, lengths: list[int], stop_ids: list[int], prompt_width: int):
        self.lengths, self.stop_ids, self.prompt_width = torch.tensor(lengths), stop_ids, prompt_width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        at_end = (self.lengths.to(scores.device) - 1 <= step)[:, None]                # [R, 1]
        only_stop = torch.full_like(scores, float("-inf"))
        only_stop[:, self.stop_ids[0]] = 0.0
        scores = scores.clone()
        scores[:, self.stop_ids] = float("-inf")
        return torch.where(at_end, only_stop, scores)


def load_results(name: str) -> dict:
    path = RESULTS_DIR / name
    return json.loads(path.read_text()) if path.exists() else {}


def save_result(name: str, device: str | torch.device, key: str, entry: dict) -> Path:
    """File ``entry`` as ``results[device_key][key]`` in ``bench/results/<name>`` (other
    devices' and entries' results are kept), with the machine description added."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / name
    saved = load_results(name)
    saved.setdefault(device_key(device), {})[key] = {**entry, "machine": machine(device)}
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return path
