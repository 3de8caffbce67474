"""Benchmark of the training data path: ``--data-path stream`` against ``eager``, at real image sizes.

The eager path (the baseline) sends every example through the processor with its image before
the first step and keeps each image's tensors for the whole iteration; the streaming path plans
the steps from token counts and has DataLoader workers load each step's images when it is near
(docs/architecture.md, "The data path"). This measures what that changes as the dataset grows.

Data: synthetic chart-like images (bars, axes, grid lines) at 448x448 and 800x600, one image
file per question: 64 distinct images per size, hard-linked under one name per question, so
every question has its own file (the eager path keeps one tensor set per file) while the disk
holds 64 (file reads come from the page cache). Question text, worked solutions and a
[✓,✗,✗] / [✓,✓,✗] / [✓,✓,✓] sample pool come from shapes-math (r3v_fast.data.shapes), so the
R³V task builders produce the usual SFT / refine / select mix: about 2.7 examples per question.
The image content does not match the question; only sizes matter here.

Model: the tiny Qwen2-VL of r3v_fast.model.tiny given Qwen2-VL's released image-processor
settings (min_pixels 56*56, max_pixels 28*28*1280), so image tensors have their real size:
448x448 -> 1024 patches (256 tokens, 4.6 MiB of pixel values), 800x600 -> 2436 patches
(609 tokens, 11.0 MiB). Training: LoRA r 64 / alpha 16 on the language model (the public
setting; the vision tower frozen), fp32, 8 examples per step (one rank's share of the public
64-example step on 8 GPUs), micro-batches of 4096 tokens, tree packing, max_length 2048,
3 epochs planned, ``MEASURED_STEPS`` steps run. The model's compute on this CPU is the same
for both paths.

Each (path, image size, questions) point runs in a fresh Python process, so that its peak
memory is its own, under an address-space limit (``resource.setrlimit``: the process's size
after loading the model plus ``MEMORY_BUDGET_GIB``) so that a path that runs out of memory
fails alone instead of starving the machine. Reported per point:

- host memory: the footprint after imports and model load (before any data), after building
  the example texts (the task builders' output, the same for both paths), and the peak during
  training: the training process's RSS plus the private memory (USS) of its DataLoader
  workers (RSS sampled every 100 ms, the workers' USS every second; the main process's exact
  peak RSS from getrusage), also as the growth above the footprint after loading the model;
- first step: seconds from ``Trainer.train`` (the model is loaded) to the end of the first
  optimizer step, plan and loading included; of these, the seconds until the first step's
  batches were ready (plan + waiting for the data path); and from process start;
- steady-state steps/s over the measured steps after the first two;
- CPU seconds spent decoding and processing images (load_image + the processor's image
  transform, from the trainer's summary) and how many images were processed; the eager path
  processes every example's image once before training, the streaming path each question's
  image once per epoch, in its workers.

Targets: streaming peak memory flat in dataset size (20k questions within 10 % of 1k) and at
most 2 GB above the model's footprint; first step within 10 s at every size; steady-state
steps/s no worse than eager. The test asserts the first two and, of the third, the data path's
part (the first step's batches ready within 10 s); the step's compute is the model's and is
reported next to it.

A second test, ``test_steady_state_on_few_cores``, runs the same 14 steps with eager loading,
eager loading next to a process keeping another core 25 % busy, streaming with one worker and
streaming in the training process, to show where the streaming path's steady-state time goes
on a machine without an idle core.

Results: bench/results/data_path.json, keyed by device. Run (tens of minutes on 2 cores):
    python -m pytest bench/bench_data_path.py -q -s
R3V_BENCH_QUESTIONS (default "1000,5000,20000") and R3V_BENCH_EAGER_QUESTIONS (default
"1000,5000") choose the dataset sizes, R3V_BENCH_THREADS (default 1) the training process's
intra-op threads.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "data_path.json"
IMAGE_SIZES = {"448x448": (448, 448), "800x600": (800, 600)}    # width x height
DISTINCT_IMAGES = 64
MEASURED_STEPS = 12
MEMORY_BUDGET_GIB = 8.0
# Intra-op threads of the training process. On the 2-core machine one core trains and the other
# runs the one DataLoader worker (min(4, cores - 1)); with 2 training threads the worker's
# decoding competes with training for the same cores.
THREADS = int(os.environ.get("R3V_BENCH_THREADS", "1"))
QWEN2VL_PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
# The public setting's LoRA (r 64 / alpha 16 on the language model, vision tower frozen) and a
# step of 8 examples: one rank's share of the public 64-example step on 8 GPUs.
TRAIN = dict(epochs=3, lr=3e-5, batch_size=8, max_tokens=4096, max_length=2048, lora_r=64, lora_alpha=16,
             warmup_steps=5, save_every=0, packing="tree")


# ---------------------------------------------------------------------------- data
def chart_image(rng: random.Random, width: int, height: int):
    """A bar chart: axes, grid lines, 4-12 bars of random heights and colours."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    left, bottom, top, right = width // 10, height - height // 8, height // 10, width - width // 20
    for k in range(6):
        y = bottom - k * (bottom - top) // 5
        draw.line([(left, y), (right, y)], fill=(215, 215, 215), width=1)
        draw.text((left // 4, y - 6), str(k * 20), fill=(60, 60, 60))
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(30, 30, 30), width=2)
    n = rng.randint(4, 12)
    slot = (right - left) / n
    for b in range(n):
        value = rng.uniform(0.05, 1.0)
        x0 = left + b * slot + slot * 0.15
        color = tuple(rng.randrange(30, 220) for _ in range(3))
        draw.rectangle([x0, bottom - value * (bottom - top), x0 + slot * 0.7, bottom - 1], fill=color)
        draw.text((x0, bottom + 4), f"c{b}", fill=(60, 60, 60))
    return img


def write_images(folder: Path, n_questions: int, width: int, height: int) -> list[str]:
    """One image file per question: DISTINCT_IMAGES charts, hard-linked under per-question names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{width}x{height}")
    bases = []
    for b in range(DISTINCT_IMAGES):
        path = folder / f"base{b:03d}.png"
        if not path.exists():
            chart_image(rng, width, height).save(path)
        bases.append(path)
    paths = []
    for q in range(n_questions):
        path = folder / f"q{q:05d}.png"
        if not path.exists():
            os.link(bases[q % DISTINCT_IMAGES], path)
        paths.append(str(path))
    return paths


def build_mix(processor, image_paths: list[str]):
    """The R³V training mix of shapes-math questions placed on the given images."""
    from r3v_fast.data import prompts
    from r3v_fast.data.records import Record
    from r3v_fast.data.shapes import make_item, template_cot
    from r3v_fast.engine.pool import Sample
    from r3v_fast.engine.tasks import build_examples

    rng = random.Random(0)
    records, pool = [], {}
    for i, path in enumerate(image_paths):
        question, answer, meta = make_item(rng, 112)
        record = Record(id=f"q{i:05d}", image=path, question=question, answer=str(answer), dataset="shapes-math",
                        meta=meta)
        right = template_cot(record)
        wrong = right.rsplit("Answer:", 1)[0] + f"Answer: {int(record.answer) + 1 + rng.randrange(3)}"
        pattern = [(True, False, False), (True, True, False), (True, True, True)][i % 3]
        pool[record.id] = [Sample(record.id, 0, k, right if ok else wrong, None, ok) for k, ok in enumerate(pattern)]
        records.append(record)
    examples, _ = build_examples(records, pool, prompts.renderer(processor))
    return examples


# ---------------------------------------------------------------------------- one measured point
class MemoryMonitor:
    """Peak of (this process's RSS + its children's USS), sampled in a thread.

    The RSS is read every ``interval`` seconds; the workers' USS, which costs a walk of their
    page tables (about 10 ms of CPU here), every ``children_every`` samples, so that measuring
    does not slow the streaming path's training (the eager path has no workers to measure).
    """

    def __init__(self, interval: float = 0.1, children_every: int = 10):
        import psutil

        self.process = psutil.Process()
        self.interval, self.children_every = interval, children_every
        self.peak = self.peak_main = 0
        self.children = 0                    # the workers' USS at the last reading
        self.workers_seen = 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, *, children: bool = True) -> int:
        import psutil

        main = self.process.memory_info().rss
        if children:
            total = 0
            kids = self.process.children(recursive=True)
            self.workers_seen = max(self.workers_seen, len(kids))
            for child in kids:
                try:
                    total += child.memory_full_info().uss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.children = total
        self.peak_main = max(self.peak_main, main)
        self.peak = max(self.peak, main + self.children)
        return main + self.children

    def _run(self):
        while not self._stop.is_set():
            self.sample(children=self._samples % self.children_every == 0)
            self._samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def measure_point(model_dir: str, data_dir: str, path: str, size: str, n_questions: int) -> dict:
    """Runs in a fresh process: build the mix, load the model, train MEASURED_STEPS steps."""
    started = time.perf_counter()
    import torch
    from accelerate import Accelerator

    from r3v_fast.engine.trainer import Trainer, TrainOptions
    from r3v_fast.model.loading import load_vlm

    torch.set_num_threads(THREADS)
    width, height = IMAGE_SIZES[size]
    image_paths = write_images(Path(data_dir) / size, n_questions, width, height)
    model, processor = load_vlm(model_dir)
    import gc

    gc.collect()
    monitor = MemoryMonitor()
    model_footprint = monitor.sample()                  # imports + model, before any data
    t_build = time.perf_counter()
    examples = build_mix(processor, image_paths)
    build_s = time.perf_counter() - t_build
    model.train()
    gc.collect()
    with_examples = monitor.sample()
    vms = monitor.process.memory_info().vms
    limit = int(vms + MEMORY_BUDGET_GIB * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    point = {"path": path, "image_size": size, "questions": n_questions, "examples": len(examples),
             "model_footprint_mb": model_footprint / 2**20, "with_examples_mb": with_examples / 2**20,
             "build_examples_s": build_s,
             "memory_limit_gib_above_model": MEMORY_BUDGET_GIB, "threads": torch.get_num_threads()}
    options = TrainOptions(**TRAIN, data_path=path)
    trainer = Trainer(model, processor, Accelerator(cpu=True), options, Path(data_dir) / f"state-{os.getpid()}",
                      log=lambda *a: None, show_progress=False)
    t_train = time.perf_counter()
    try:
        with monitor:
            summary = trainer.train(examples, max_steps=MEASURED_STEPS)
    except Exception as err:                      # noqa: BLE001 - the engine may wrap the allocator's error
        if not isinstance(err, MemoryError) and "allocate memory" not in str(err) \
                and "MemoryError" not in str(err):
            raise
        reached = re.search(r"example (\d+)\)", str(err))
        point.update(out_of_memory=True, error=str(err).splitlines()[0][-300:],
                     seconds_until_oom=time.perf_counter() - t_train,
                     examples_processed_before_oom=int(reached.group(1)) if reached else None,
                     peak_mb=monitor.peak / 2**20, peak_above_model_mb=(monitor.peak - model_footprint) / 2**20)
        return point
    peak_main_rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # exact, main process
    history = summary["history"]
    times = [h["seconds"] for h in history]
    steady = (len(times) - 3) / (times[-1] - times[2]) if len(times) > 3 else None
    point.update(
        out_of_memory=False, steps_run=len(times), steps_planned=summary["steps"],
        peak_mb=monitor.peak / 2**20, peak_main_rss_mb=peak_main_rusage / 2**20,
        peak_above_model_mb=(monitor.peak - model_footprint) / 2**20, workers=monitor.workers_seen,
        first_step_s=times[0], first_step_from_process_start_s=t_train - started + times[0],
        first_batch_ready_s=history[0]["batch_ready_s"], steady_steps_per_s=steady,
        steady_data_wait_s=sum(h["data_wait_s"] for h in history[3:]), image_cpu_s=summary["image_cpu_s"],
        images_processed=summary["images_processed"],
        image_cpu_ms_per_image=1000 * summary["image_cpu_s"] / max(1, summary["images_processed"]),
        plan_s=summary.get("plan_seconds"), plan_tokenized=summary.get("plan_tokenized"))
    return point


def run_point(model_dir: Path, data_dir: Path, path: str, size: str, n_questions: int) -> dict:
    """``measure_point`` in a fresh interpreter; its JSON line, or the failure."""
    cmd = [sys.executable, __file__, "--point", json.dumps([str(model_dir), str(data_dir), path, size, n_questions])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    # A native allocation failure (e.g. in the tokenizer library) aborts the process outright.
    aborted_for_memory = "memory allocation" in proc.stderr or "MemoryError" in proc.stderr
    return {"path": path, "image_size": size, "questions": n_questions, "failed": not aborted_for_memory,
            "out_of_memory": aborted_for_memory, "returncode": proc.returncode,
            "stderr_tail": proc.stderr[-1500:]}


# ---------------------------------------------------------------------------- results
def device_key() -> str:
    """cpu:<model name> (<n> cores): the machine the numbers belong to."""
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu:{name} ({os.cpu_count()} cores)"


def save(entries: dict) -> None:
    RESULTS_PATH.parent.mkdir(exist_ok=True)
    saved = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.exists() else {}
    saved.setdefault(device_key(), {}).update(entries)
    RESULTS_PATH.write_text(json.dumps(saved, indent=2) + "\n")


def sizes(variable: str, default: str) -> list[int]:
    return [int(n) for n in os.environ.get(variable, default).split(",") if n.strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from r3v_fast.model.tiny import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl_real_pixels"), seed=0, **QWEN2VL_PIXELS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_path_bench")


@pytest.mark.parametrize("size", list(IMAGE_SIZES))
def test_data_path(model_dir, data_dir, size):
    points = {}
    for n in sizes("R3V_BENCH_QUESTIONS", "1000,5000,20000"):
        points[f"stream/{n}"] = run_point(model_dir, data_dir, "stream", size, n)
        print(f"\n{size} stream {n}: {json.dumps(points[f'stream/{n}'])}", flush=True)
    for n in sizes("R3V_BENCH_EAGER_QUESTIONS", "1000,5000"):
        points[f"eager/{n}"] = run_point(model_dir, data_dir, "eager", size, n)
        print(f"\n{size} eager {n}: {json.dumps(points[f'eager/{n}'])}", flush=True)
        if points[f"eager/{n}"].get("out_of_memory"):
            break                                         # a larger set would run out sooner
    stream = {int(k.split("/")[1]): v for k, v in points.items() if k.startswith("stream/")}
    eager = {int(k.split("/")[1]): v for k, v in points.items() if k.startswith("eager/")}
    checks = {}
    if len(stream) > 1:
        small, large = min(stream), max(stream)
        checks["stream_peak_growth"] = stream[large]["peak_mb"] / stream[small]["peak_mb"] - 1
    checks["stream_max_peak_above_model_mb"] = max(p["peak_above_model_mb"] for p in stream.values())
    checks["stream_max_first_step_s"] = max(p["first_step_s"] for p in stream.values())
    checks["stream_max_first_batch_ready_s"] = max(p["first_batch_ready_s"] for p in stream.values())
    common = [n for n in eager if not eager[n].get("out_of_memory") and not eager[n].get("failed") and n in stream]
    if common:
        n = min(common)
        checks["steps_per_s_stream_over_eager"] = stream[n]["steady_steps_per_s"] / eager[n]["steady_steps_per_s"]
        checks["first_step_eager_over_stream"] = eager[n]["first_step_s"] / stream[n]["first_step_s"]
    save({f"{size}, {THREADS} training thread(s)": {"points": points, "checks": checks, "train": TRAIN, "measured_steps": MEASURED_STEPS,
                 "processor": QWEN2VL_PIXELS, "distinct_images": DISTINCT_IMAGES}})
    print(f"\n{size} checks: {json.dumps(checks)}")
    assert all(not p.get("failed") for p in stream.values()), "a streaming run failed"
    if "stream_peak_growth" in checks:
        assert checks["stream_peak_growth"] <= 0.10, "streaming peak memory grows with the dataset"
    assert checks["stream_max_peak_above_model_mb"] <= 2000, "streaming peak above 2 GB over the model"
    # The data path's part of the first step: plan + the first step's batches ready. The step's
    # own compute (the model's, the same for both paths) comes on top; both are reported.
    assert checks["stream_max_first_batch_ready_s"] <= 10.0, "first step's data later than 10 s after the model load"


# ---------------------------------------------------------------------------- steady state on few cores
def _busy(duty: float, stop) -> None:
    """Keep one core busy ``duty`` of the time (numpy work in 100 ms periods)."""
    import numpy as np

    x = np.random.default_rng(0).random((448, 448, 3), dtype=np.float32)
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < duty * 0.1:
            float((x * 1.0001).sum())
        time.sleep((1 - duty) * 0.1)


def steady_rate(model, processor, examples, folder: Path, **changes) -> tuple[float, float]:
    """(steps/s after the first 3 steps, seconds waited for data) of 14 training steps."""
    import copy

    from accelerate import Accelerator

    from r3v_fast.engine.trainer import Trainer, TrainOptions

    trainer = Trainer(copy.deepcopy(model), processor, Accelerator(cpu=True), TrainOptions(**{**TRAIN, **changes}),
                      folder / f"state-{time.time_ns()}", log=lambda *a: None, show_progress=False)
    history = trainer.train(examples, max_steps=14)["history"]
    return ((len(history) - 3) / (history[-1]["seconds"] - history[2]["seconds"]),
            sum(h["data_wait_s"] for h in history[3:]))


def test_steady_state_on_few_cores(model_dir, data_dir):
    """Where the streaming path's steady-state time goes when there is no idle core: the same
    steps with eager loading, eager loading next to a process that keeps another core 25 % busy
    (about what the worker's decoding costs at 448²), streaming with one worker, and streaming
    in the training process (``num_workers=0``: loading not overlapped), twice each."""
    import multiprocessing

    import torch

    from r3v_fast.model.loading import load_vlm

    torch.set_num_threads(THREADS)
    paths = write_images(data_dir / "448x448", 300, 448, 448)
    model, processor = load_vlm(model_dir)
    examples = build_mix(processor, paths)
    runs: dict[str, list] = {}
    for _ in range(2):
        for label, changes, duty in (("eager", dict(data_path="eager"), 0.0),
                                     ("eager, another core 25 % busy", dict(data_path="eager"), 0.25),
                                     ("stream, 1 worker", dict(data_path="stream", num_workers=1), 0.0),
                                     ("stream, in process", dict(data_path="stream", num_workers=0), 0.0)):
            stop = multiprocessing.Event()
            busy = multiprocessing.Process(target=_busy, args=(duty, stop)) if duty else None
            if busy:
                busy.start()
            try:
                rate, waited = steady_rate(model, processor, examples, data_dir, **changes)
            finally:
                if busy:
                    stop.set()
                    busy.join()
            runs.setdefault(label, []).append({"steps_per_s": rate, "data_wait_s": waited})
    entry = {"questions": 300, "image_size": "448x448", "threads": THREADS, "runs": runs,
             "relative_to_eager": {k: sum(r["steps_per_s"] for r in v) / sum(r["steps_per_s"] for r in runs["eager"])
                                   for k, v in runs.items()}}
    save({f"steady state on few cores, {THREADS} training thread(s)": entry})
    print("\n" + json.dumps(entry, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--point":
        print(json.dumps(measure_point(*json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit(pytest.main([__file__, "-q", "-s"]))
