"""Per-kernel profile of the Triton fused losses on a GPU, for tuning their configurations.

The benchmark (bench_segment_logprob_gpu.py) gives one forward+backward time per loss; this
script splits it by kernel with torch.profiler for a few configuration variants, and times
the cuBLAS product h·wᵀ of the same shape as the ceiling of one 2·T·D·V phase.

* token_logprob (four phases: forward, recompute + G, dW, dH): KernelConfig variants of
  kernels/segment_logprob.py, kernel families fwd/bwd/dw/dh/glue.
* weighted_nll (three phases, two with a frozen head): KernelConfig variants of
  kernels/weighted_nll.py (chunk size, row-kernel width); device time of cuBLAS GEMMs, the
  row kernel and the rest; each GEMM phase timed alone (x chunks); memory above the
  gradients; the backward (in-place scale, and its skip when the upstream gradient is 1); dW
  error against an fp32 reference next to the one-rounding error of token_logprob's dW, the
  price of accumulating dW in bf16 once per chunk.

    python bench/profile_segment_logprob_gpu.py            (Qwen2-VL-7B head: 8192 x 3584 x 151936, bf16)
    R3V_PROFILE_VARIANTS=default,pps16 R3V_PROFILE_WNLL_VARIANTS=default,chunk1024 python bench/profile_segment_logprob_gpu.py
    R3V_PROFILE_OPS=weighted_nll python bench/profile_segment_logprob_gpu.py

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
from r3v_fast.kernels import weighted_nll as wnll_kernels

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


WNLL_BASE = wnll_kernels.GPU_CONFIG_16BIT
WNLL_VARIANTS = {
    "default": WNLL_BASE,                                              # 512-token chunks
    "chunk256": dataclasses.replace(WNLL_BASE, chunk_tokens=256),      # Liger's chunk for this shape
    "chunk384": dataclasses.replace(WNLL_BASE, chunk_tokens=384),      # ~1.1x the gradients
    "chunk1024": dataclasses.replace(WNLL_BASE, chunk_tokens=1024),
    "row8192": dataclasses.replace(WNLL_BASE, block_v=8192, num_warps=16),
    "row2048": dataclasses.replace(WNLL_BASE, block_v=2048, num_warps=4),
}
_GEMM_NAMES = ("gemm", "xmma", "nvjet", "cutlass", "sm90", "sm80", "ampere", "hopper", "cublas")


def _family_wnll(name: str) -> str:
    if "_weighted_nll_fwd_kernel" in name:
        return "row_kernel"
    if "_weighted_nll_scale_kernel" in name:
        return "scale_kernel"
    return "gemm" if any(k in name.lower() for k in _GEMM_NAMES) else "other"


def device_time_by_family(fn, family) -> dict[str, float]:
    """Milliseconds of device time per family(kernel name) for one call of fn (after a warm-up)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[family(event.key)] += event.device_time_total / 1e3
    return {k: round(v, 3) for k, v in sorted(totals.items())}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).abs().max() / ref.abs().max()).item()


def _gemm_phases(hidden, weight, c, chunks) -> dict[str, float]:
    """Each GEMM phase alone on one chunk's shapes, times the number of chunks (ms)."""
    h_c = hidden[:c].contiguous()  # [c, D]
    z = torch.empty(c, V, dtype=hidden.dtype, device=hidden.device)  # [c, V]
    d_w = torch.empty_like(weight)  # [V, D]
    return {"logits": round(cuda_ms(lambda: torch.mm(h_c, weight.T, out=z)) * chunks, 3),
            "dh": round(cuda_ms(lambda: torch.mm(z, weight)) * chunks, 3),
            "dw": round(cuda_ms(lambda: d_w.addmm_(z.T, h_c)) * chunks, 3)}


def _backward_scale(outputs) -> tuple[float, float]:
    """The backward: dH and dW times the upstream gradient in place (ms), and its skip when 1."""
    _, dh, dw, _ = outputs
    other = torch.tensor(0.999, device=dh.device)
    one = torch.tensor(1.0, device=dh.device)
    return (cuda_ms(lambda: (wnll_kernels.scale_(other, dh), wnll_kernels.scale_(other, dw))),
            cuda_ms(lambda: (wnll_kernels.scale_(one, dh), wnll_kernels.scale_(one, dw))))


def profile_weighted_nll(hidden, weight, targets, cublas_ms) -> dict:
    valid = targets != -100
    token_weights = valid.float() / valid.sum()
    grad_bytes = (T * D + V * D) * 2
    # dW references: fp32 inputs through token_logprob (fp32 accumulation everywhere), and the
    # bf16 token_logprob dW (fp32 accumulation over all tokens, one rounding: eager-like).
    def token_logprob_dw(h, w):
        _, lse = kernels.token_logprob_fwd(h, w, None, targets, valid, 0.0)
        return kernels.token_logprob_bwd(h, w, None, targets, valid, lse, -token_weights, 0.0,
                                         False, True, False)[1]
    ref_dw = token_logprob_dw(hidden.float(), weight.float())  # [V, D] fp32
    one_rounding = _rel(token_logprob_dw(hidden, weight), ref_dw)
    report = {"three_product_floor_ms": round(3 * cublas_ms, 3), "two_product_floor_ms": round(2 * cublas_ms, 3),
              "dw_error_one_rounding": round(one_rounding, 5), "variants": {}}
    print(f"weighted_nll floors: x3 {3 * cublas_ms:.2f} ms, x2 {2 * cublas_ms:.2f} ms; "
          f"token_logprob bf16 dW error {one_rounding:.2e}")
    wanted = os.environ.get("R3V_PROFILE_WNLL_VARIANTS")
    names = list(WNLL_VARIANTS) if wanted in (None, "", "all") else wanted.split(",")
    for name in names:
        cfg = WNLL_VARIANTS[name]
        chunks = -(-T // cfg.chunk_tokens)

        def run(need_weight, cfg=cfg):
            return wnll_kernels.weighted_nll_fwd(hidden, weight, None, targets, valid, token_weights, 0.0,
                                                 True, need_weight, False, config=cfg)
        try:
            full_ms, frozen_ms = cuda_ms(lambda: run(True)), cuda_ms(lambda: run(False))
            parts = device_time_by_family(lambda: run(True), _family_wnll)
            parts_frozen = device_time_by_family(lambda: run(False), _family_wnll)
            phases = _gemm_phases(hidden, weight, min(cfg.chunk_tokens, T), chunks)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            dw = run(True)[2]
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            dw_error = _rel(dw, ref_dw)
            dw = None
            scale_ms, skip_ms = _backward_scale(run(True))
            entry = dict(ms=round(full_ms, 3), frozen_ms=round(frozen_ms, 3),
                         tflops_6tdv=round(3 * PHASE_FLOP / full_ms / 1e9, 1),
                         tflops_8tdv=round(4 * PHASE_FLOP / full_ms / 1e9, 1),
                         over_three_product_floor=round(full_ms / (3 * cublas_ms), 3),
                         frozen_over_two_product_floor=round(frozen_ms / (2 * cublas_ms), 3),
                         kernels_ms=parts, kernels_ms_frozen=parts_frozen,
                         gemm_phases_ms=phases,
                         backward_scale_ms=round(scale_ms, 3), backward_skip_ms=round(skip_ms, 3),
                         peak_over_gradients=round(peak / grad_bytes, 3), dw_error=round(dw_error, 5),
                         config=dataclasses.asdict(cfg))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory for a large chunk
            entry = dict(error=f"{type(err).__name__}: {err}"[:400], config=dataclasses.asdict(cfg))
        report["variants"][name] = entry
        print(f"weighted_nll {name:12s}", {k: v for k, v in entry.items() if k != "config"}, flush=True)
    return report


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

    ops = os.environ.get("R3V_PROFILE_OPS", "token_logprob,weighted_nll").split(",")
    if "weighted_nll" in ops:
        report["weighted_nll"] = profile_weighted_nll(hidden, weight, targets, cublas_ms)
    wanted = os.environ.get("R3V_PROFILE_VARIANTS")
    names = list(VARIANTS) if wanted in (None, "", "all") else wanted.split(",")
    for name in names if "token_logprob" in ops else []:
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
