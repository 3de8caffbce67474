"""Per-kernel profile of the Triton fused loss on a GPU, for tuning its tile configuration.

The benchmark (bench_segment_logprob_gpu.py) gives one forward+backward time; this script
splits it by kernel (forward, recompute-G, dW GEMM, dH GEMM, glue) with torch.profiler for a
few KernelConfig variants, and times the cuBLAS product h·wᵀ of the same shape as the
ceiling of one 2·T·D·V phase (the op does four such phases: forward, recompute, dW, dH).

    python bench/profile_segment_logprob_gpu.py            (Qwen2-VL-7B head: 8192 x 3584 x 151936, bf16)
    R3V_PROFILE_VARIANTS=default,pps16 python bench/profile_segment_logprob_gpu.py

Writes bench/results/segment_logprob_profile.json (keyed by device) and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path

import torch

# This folder is on sys.path when the script runs: the benchmark's shape, inputs and timer.
from bench_segment_logprob_gpu import D, T, V, _device_key, cuda_ms, make_inputs
from r3v_fast.kernels import segment_logprob as kernels

PHASE_FLOP = 2 * T * D * V
RESULTS = Path(__file__).resolve().parent / "results" / "segment_logprob_profile.json"

BASE = kernels.GPU_CONFIG_16BIT
# The first configuration (all Triton, 128 x 128 tiles), kept as the reference of the tuning.
FIRST = kernels.KernelConfig(128, 128, 64, (128, 128, 64), (128, 128, 64), 8, 3, 8, 4, 64 << 20, 1 << 30)
VARIANTS = {
    "default": BASE,
    "first": FIRST,
    "dw_triton": dataclasses.replace(BASE, dw_by_torch_mm=False),
    "chunk128mb": dataclasses.replace(BASE, chunk_bytes=128 << 20),
    "chunk32mb": dataclasses.replace(BASE, chunk_bytes=32 << 20),
    "v128": dataclasses.replace(BASE, block_v=128),
    "pps4": dataclasses.replace(BASE, programs_per_sm=4),
    "stages4": dataclasses.replace(BASE, num_stages=4),
    "dh_n128": dataclasses.replace(BASE, dh_block=(128, 128, 64)),
}


def kernel_breakdown(fn) -> dict[str, float]:
    """Milliseconds of device time per kernel family for one call of fn (after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.key
        family = next((k for k in ("fwd_kernel", "bwd_kernel", "dw_kernel", "dh_kernel") if k in name), "glue")
        totals[family] += event.device_time_total / 1e3
    return {k: round(v, 3) for k, v in sorted(totals.items())}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_segment_logprob_gpu: needs a CUDA device")
    hidden, weight, targets = make_inputs()  # the benchmark's inputs (same seed), without autograd
    hidden, weight = hidden.detach(), weight.detach()
    valid = targets != -100
    grad = torch.full((T,), 1.0 / T, device="cuda")

    cublas_ms = cuda_ms(lambda: hidden @ weight.T)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "shape": dict(T=T, D=D, V=V, dtype="bfloat16"),
              "cublas_phase_ms": round(cublas_ms, 3),
              "cublas_phase_tflops": round(PHASE_FLOP / cublas_ms / 1e9, 1), "variants": {}}
    print(f"cuBLAS h·wᵀ (one phase): {cublas_ms:.2f} ms = {report['cublas_phase_tflops']} TFLOP/s")

    wanted = os.environ.get("R3V_PROFILE_VARIANTS")
    names = list(VARIANTS) if wanted in (None, "", "all") else wanted.split(",")
    for name in names:
        cfg = VARIANTS[name]

        def fwd():
            return kernels.token_logprob_fwd(hidden, weight, None, targets, valid, 0.0, config=cfg)

        def bwd(lse):
            return kernels.token_logprob_bwd(hidden, weight, None, targets, valid, lse, grad, 0.0,
                                             True, True, False, config=cfg)
        try:
            _, lse = fwd()
            bwd(lse)
            torch.cuda.synchronize()
            fwd_ms, bwd_ms = cuda_ms(fwd), cuda_ms(lambda: bwd(lse))
            parts = kernel_breakdown(lambda: (fwd(), bwd(lse)))
            torch.cuda.synchronize()
            base_bytes = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            bwd(lse)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base_bytes - (T * D + V * D) * 2  # above dH + dW
            entry = dict(fwd_ms=round(fwd_ms, 3), bwd_ms=round(bwd_ms, 3), total_ms=round(fwd_ms + bwd_ms, 3),
                         kernels_ms=parts, bwd_extra_mb_over_grads=round(extra / 2**20, 1),
                         phase_tflops={k: round(PHASE_FLOP / v / 1e9, 1) for k, v in parts.items() if k != "glue"},
                         config=dataclasses.asdict(cfg))
        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory for a large tile
            entry = dict(error=f"{type(err).__name__}: {err}"[:400], config=dataclasses.asdict(cfg))
        report["variants"][name] = entry
        print(f"{name:22s}", {k: v for k, v in entry.items() if k != "config"}, flush=True)

    RESULTS.parent.mkdir(exist_ok=True)
    key = _device_key()
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous[key] = report
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"results -> {RESULTS}")


if __name__ == "__main__":
    main()
