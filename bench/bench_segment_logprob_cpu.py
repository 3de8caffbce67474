"""CPU benchmark of the fused LM-head loss (issues 5 and 16): the C++ backend vs the usual ways.

Shape: T=4096 target tokens x D=1024 x V=32768, fp32, forward + backward of the summed token
NLL with gradients for hidden and weight. In the same run:

    cpp_direct            r3v_fast/ops/cpp_backend.py fwd + bwd called directly (no autograd)
    cpp_op                r3v_fast.ops.token_logprob(..., backend="cpp") through autograd
    torch_backend         r3v_fast.ops.token_logprob(..., backend="torch") (chunked PyTorch)
    wnll_cpp_direct       cpp_backend.weighted_nll_fwd called directly: loss and gradients
    wnll_cpp_op           r3v_fast.ops.weighted_nll(..., backend="cpp") + backward (weights 1)
    wnll_cpp_frozen       the same with the weight frozen (no dW: two products)
    wnll_torch_backend    r3v_fast.ops.weighted_nll(..., backend="torch") (chunked PyTorch)
    torch_native          torch.nn.functional.linear_cross_entropy, default (reference) path
    torch_native_chunked  the same with options=LinearCrossEntropyOptions() (its chunked path)
    naive                 full logits, log_softmax, gather

Time: wall-clock of one forward + backward, the minimum over ROUNDS runs (the machine has 2
cores shared with other work: the minimum is the least disturbed run; the load average is
saved with the results). The process CPU time of the step (all threads) is saved next to it:
it is what the step costs the machine, and it barely moves when other work competes for the
cores, so its ratios (cpu_time_over_*) stay meaningful on a busy machine. GFLOP/s is given
in two conventions for every row: 8·T·D·V ("gflops", token_logprob's work: forward GEMM,
recomputed logits, dH, dW) and 6·T·D·V (weighted_nll's and the unfused paths' work: logits,
dH, dW; the convention Liger-Kernel reports in). The frozen row does 4·T·D·V.

Memory: peak resident memory above the baseline during one step, from the kernel's own
accounting of the process (VmHWM after resetting it through /proc/self/clear_refs), measured
in a fresh subprocess per implementation so no allocator cache from an earlier step hides
anything. The baseline is taken after the inputs exist and one tiny warm-up step ran (libraries
and thread pools initialised), so the figure includes every buffer the step allocates,
gradients (dH + dW) included. For the cpp backend the scratch bytes it allocates by its own
accounting (cpp_backend.workspace_bytes) are reported next to it.

Targets: token_logprob cpp time <= 1.1x torch's native op (issue 5); weighted_nll cpp time
<= 0.8x torch's native op (issue 16); cpp peak extra memory <= 15% of naive (both).
Results: bench/results/cpu-<cpu model>-<avx512|avx2>.json. Small quick run: R3V_BENCH_SMALL=1 (T=512,
D=256, V=4096); R3V_BENCH_T / _D / _V / _ROUNDS override single values.
Run: python -m pytest bench/bench_segment_logprob_cpu.py -q -s
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SMALL = os.environ.get("R3V_BENCH_SMALL") == "1"
T = int(os.environ.get("R3V_BENCH_T", 512 if SMALL else 4096))
D = int(os.environ.get("R3V_BENCH_D", 256 if SMALL else 1024))
V = int(os.environ.get("R3V_BENCH_V", 4096 if SMALL else 32768))
ROUNDS = int(os.environ.get("R3V_BENCH_ROUNDS", 2))
FLOP = 8 * T * D * V
FLOP_6 = 6 * T * D * V
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS: dict[str, dict] = {}


# ---------------------------------------------------------------- implementations: step(h, w, t)
# Each runs forward + backward of loss = -sum_t log p(t) and leaves dH, dW in h.grad, w.grad.
def _cpp_direct(h, w, t):
    from r3v_fast.ops import cpp_backend

    _, lse = cpp_backend.token_logprob_fwd(h.detach(), w.detach(), None, t, 0.0)
    grad = torch.full((t.numel(),), -1.0)  # d loss / d logp
    h.grad, w.grad, _ = cpp_backend.token_logprob_bwd(h.detach(), w.detach(), None, t, lse, grad, 0.0,
                                                      True, True, False)


def _op(backend):
    def step(h, w, t):
        from r3v_fast.ops import token_logprob

        (-token_logprob(h, w, t, backend=backend).sum()).backward()
    return step


def _wnll_cpp_direct(h, w, t):
    from r3v_fast.ops import cpp_backend

    ones = torch.ones(t.numel())
    _, h.grad, w.grad, _ = cpp_backend.weighted_nll_fwd(h.detach(), w.detach(), None, t, ones, 0.0, True, True, False)


def _wnll_op(backend, frozen=False):
    def step(h, w, t):
        from r3v_fast.ops import weighted_nll

        w_in = w.detach() if frozen else w
        weighted_nll(h, w_in, t, torch.ones(t.numel()), backend=backend).backward()
    return step


def _native(h, w, t):
    F.linear_cross_entropy(h, w, t, reduction="sum").backward()


def _native_chunked(h, w, t):
    F.linear_cross_entropy(h, w, t, reduction="sum", options=torch.nn.LinearCrossEntropyOptions()).backward()


def _naive(h, w, t):
    logits = h @ w.T                                                         # [T, V]
    (-torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).sum()).backward()


def _cpp_available() -> bool:
    from r3v_fast.ops import cpp_backend

    return cpp_backend.available()


def _op_available(backend: str) -> bool:
    try:
        from r3v_fast.ops import token_logprob  # noqa: F401
    except ImportError:
        return False
    return backend != "cpp" or _cpp_available()


IMPLEMENTATIONS = {
    "cpp_direct": (_cpp_direct, _cpp_available),
    "cpp_op": (_op("cpp"), lambda: _op_available("cpp")),
    "torch_backend": (_op("torch"), lambda: _op_available("torch")),
    "wnll_cpp_direct": (_wnll_cpp_direct, _cpp_available),
    "wnll_cpp_op": (_wnll_op("cpp"), lambda: _op_available("cpp")),
    "wnll_cpp_frozen": (_wnll_op("cpp", frozen=True), lambda: _op_available("cpp")),
    "wnll_torch_backend": (_wnll_op("torch"), lambda: _op_available("torch")),
    "torch_native": (_native, lambda: hasattr(F, "linear_cross_entropy")),
    "torch_native_chunked": (_native_chunked, lambda: hasattr(torch.nn, "LinearCrossEntropyOptions")),
    "naive": (_naive, lambda: True),
}


# ---------------------------------------------------------------- measurement
def make_inputs(t=T, d=D, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=g).requires_grad_()                   # [T, D]
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_()      # [V, D]
    targets = torch.randint(0, v, (t,), generator=g)                           # [T]
    return hidden, weight, targets


def _step_seconds(step, hidden, weight, targets) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    hidden.grad = weight.grad = None
    start, cpu_start = time.perf_counter(), time.process_time()
    step(hidden, weight, targets)
    return time.perf_counter() - start, time.process_time() - cpu_start


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_extra_bytes(name: str) -> int:
    """Run in a fresh process (see the module docstring): peak RSS above the baseline."""
    step, _ = IMPLEMENTATIONS[name]
    step(*make_inputs(64, 32, 128))                   # load libraries, start thread pools
    hidden, weight, targets = make_inputs()
    Path("/proc/self/clear_refs").write_text("5")     # VmHWM := VmRSS
    base = _rss_kib("VmRSS")
    step(hidden, weight, targets)
    return (_rss_kib("VmHWM") - base) * 1024


def _measure_memory_in_subprocess(name: str) -> int | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    out = subprocess.run([sys.executable, __file__, "--peak-memory", name], capture_output=True, text=True,
                         env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())}, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _vector_isa() -> str:
    """The widest vector extension the CPU has: one model name ("AMD EPYC") covers machines
    with and without AVX-512, whose results must not overwrite each other."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return "unknown"
    flags = set(flags.split(":", 1)[-1].split())
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "generic"


def _device_key() -> str:
    return "cpu-" + re.sub(r"[^a-z0-9]+", "-", _cpu_model().lower()).strip("-") + "-" + _vector_isa()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@pytest.fixture(scope="module", autouse=True)
def write_results():
    load_before = _load()
    yield
    if not RESULTS:
        return
    baseline = {k: RESULTS[k] for k in ("torch_native", "torch_native_chunked", "naive") if k in RESULTS}
    for entry in RESULTS.values():
        for key, ref in baseline.items():
            entry[f"time_over_{key}"] = round(entry["ms"] / ref["ms"], 3)
            entry[f"cpu_time_over_{key}"] = round(entry["cpu_ms"] / ref["cpu_ms"], 3)
        if entry.get("peak_extra_mb") is not None and baseline.get("naive", {}).get("peak_extra_mb"):
            entry["mem_over_naive"] = round(entry["peak_extra_mb"] / baseline["naive"]["peak_extra_mb"], 4)
    summary = {
        "device": _cpu_model(), "host": platform.node(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "shape": dict(T=T, D=D, V=V, dtype="float32"), "flop_counted": FLOP, "flop_counted_6tdv": FLOP_6,
        "rounds": ROUNDS,
        "load_average_before_after": [load_before, _load()], "results": RESULTS,
    }
    from r3v_fast.ops import cpp_backend

    if cpp_backend.available():
        from r3v_fast import _C

        summary["cpp_build"] = dict(simd=_C.simd, openmp=_C.openmp)
    natives = [baseline[k] for k in ("torch_native", "torch_native_chunked") if k in baseline]
    for ours in ("cpp_op", "cpp_direct"):
        if ours in RESULTS and natives:
            entry = RESULTS[ours]
            summary.setdefault("targets", {})[ours] = {
                "time<=1.1x_fastest_native": entry["ms"] <= 1.1 * min(n["ms"] for n in natives),
                "cpu_time<=1.1x_fastest_native": entry["cpu_ms"] <= 1.1 * min(n["cpu_ms"] for n in natives),
                "mem<=0.15x_naive": entry.get("mem_over_naive") is not None and entry["mem_over_naive"] <= 0.15,
            }
    native = baseline.get("torch_native")
    for ours in ("wnll_cpp_op", "wnll_cpp_direct"):
        if ours in RESULTS and native:
            entry = RESULTS[ours]
            summary.setdefault("targets", {})[ours] = {
                "time<=0.8x_torch_native": entry["ms"] <= 0.8 * native["ms"],
                "cpu_time<=0.8x_torch_native": entry["cpu_ms"] <= 0.8 * native["cpu_ms"],
                "mem<=0.15x_naive": entry.get("mem_over_naive") is not None and entry["mem_over_naive"] <= 0.15,
            }
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{_device_key()}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous["segment_logprob_cpu" + ("_small" if (T, D, V) != (4096, 1024, 32768) else "")] = summary
    path.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"\nresults -> {path}   (T={T} D={D} V={V}, load {load_before} -> {_load()})")
    for name, entry in RESULTS.items():
        mem = entry.get("peak_extra_mb")
        print(f"{name:22s} {entry['ms']:9.1f} ms (cpu {entry['cpu_ms']:9.1f} ms) {entry['gflops_6tdv']:6.1f} | "
              f"{entry['gflops']:6.1f} GFLOP/s (6|8 TDV) "
              f"{'n/a' if mem is None else f'{mem:8.1f}'} MB peak extra  "
              + "  ".join(f"{k[10:]} x{v}" for k, v in entry.items() if k.startswith("time_over_"))
              + (f"  cpu/native x{entry['cpu_time_over_torch_native']}" if "cpu_time_over_torch_native" in entry else "")
              + (f"  mem/naive {entry['mem_over_naive']}" if "mem_over_naive" in entry else ""))


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_fused_loss_cpu_speed_and_memory(name, benchmark):
    step, available = IMPLEMENTATIONS[name]
    if not available():
        pytest.skip(f"{name} not available (extension not built / op or torch API missing)")
    step(*make_inputs(64, 32, 128))  # warm-up at a tiny shape: imports, thread pools
    hidden, weight, targets = make_inputs()
    times = []
    benchmark.pedantic(lambda: times.append(_step_seconds(step, hidden, weight, targets)),
                       rounds=ROUNDS, iterations=1, warmup_rounds=0)
    seconds = min(wall for wall, _ in times)
    peak = _measure_memory_in_subprocess(name)
    RESULTS[name] = dict(ms=round(seconds * 1e3, 1), all_ms=[round(wall * 1e3, 1) for wall, _ in times],
                         cpu_ms=round(min(cpu for _, cpu in times) * 1e3, 1),
                         gflops=round(FLOP / seconds / 1e9, 1), gflops_6tdv=round(FLOP_6 / seconds / 1e9, 1),
                         peak_extra_mb=None if peak is None else round(peak / 2**20, 1))
    if name.startswith("cpp"):
        from r3v_fast.ops import cpp_backend

        RESULTS[name]["workspace_mb"] = dict(
            forward=round(cpp_backend.workspace_bytes(T, D, V, backward=False) / 2**20, 1),
            backward=round(cpp_backend.workspace_bytes(T, D, V, backward=True) / 2**20, 1))
        RESULTS[name]["gradient_buffers_mb"] = round((T * D + V * D) * 4 / 2**20, 1)
    if name.startswith("wnll_cpp"):
        from r3v_fast.ops import cpp_backend

        frozen = name.endswith("frozen")
        RESULTS[name]["workspace_mb"] = round(
            cpp_backend.weighted_nll_workspace_bytes(T, D, V, need_weight=not frozen) / 2**20, 1)
        RESULTS[name]["gradient_buffers_mb"] = round((T * D + (0 if frozen else V * D)) * 4 / 2**20, 1)
    benchmark.extra_info.update(RESULTS[name])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--peak-memory":
    print(peak_extra_bytes(sys.argv[2]))
