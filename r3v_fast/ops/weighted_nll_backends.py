"""Per-backend forward (gradients included) and gradient scaling of the weighted token NLL.

The registered ops in r3v_fast.ops.weighted_nll call only the functions below; here they are
routed to a backend (docs/architecture.md, "Ops and backends"):

* "triton": kernels/weighted_nll.py. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  Every row goes through the GEMMs (no host sync to learn how many count).
* "cpp":    csrc/weighted_nll.cpp through r3v_fast/ops/cpp_backend.py (fp32, CPU).
* "torch":  r3v_fast/reference/weighted_nll.py, chunked pure PyTorch, anywhere.

"cpp" and "torch" share one contract (every target valid, weight-0 rows contribute nothing,
finite hidden rows), so they share the glue of the fused log-likelihood: on CPU tensors the
counted rows are compacted with ``nonzero`` (the CPU has no device to sync with) and cost
scales with target tokens; on CUDA the torch backend keeps every row, with ignored rows zeroed.
The cpp backend takes fp32 (16-bit inputs are upcast, gradients cast back); the torch backend
runs in the inputs' dtypes.

The loss is Σ over tokens of -w·logp, summed in float64 in a fixed order. Ignored tokens
(target == ignore_index) weigh 0 whatever their weight says (NaN included) and their logp is
0; a target outside [0, V) that is not ignored gives NaN (checking it would need a host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from r3v_fast.ops.backend import resolve_backend as _resolve
from r3v_fast.ops.backend import triton_available
from r3v_fast.ops.segment_logprob_backends import _f32, _host_rows, _put, _take, _valid
from r3v_fast.reference import weighted_nll as reference


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton" | "cpp" | "torch") for tensors on ``device``."""
    return _resolve("weighted_nll", backend, device)


def _kernels():
    from r3v_fast.kernels import weighted_nll as kernels

    return kernels


def weighted_nll_forward(hidden: Tensor, weight: Tensor, targets: Tensor, token_weights: Tensor,
                         bias: Tensor | None, ignore_index: int, softcap: float, backend: str,
                         need_hidden: bool, need_weight: bool, need_bias: bool):
    """(loss [] f32, logp [N] f32, dH [N, D] | None, dW [V, D] | None, dB [V] | None).

    hidden [N, D] (any strides), weight [V, D], targets [N] int64, token_weights [N] float.
    The gradients are those of ``loss`` itself (upstream gradient 1), in the inputs' dtypes.
    """
    n = hidden.shape[0]
    valid = _valid(targets, weight.shape[0], ignore_index)  # [N]
    w = torch.where(valid, token_weights.to(torch.float32), 0.0)  # [N]: ignored tokens weigh 0
    need_bias = need_bias and bias is not None
    if backend == "triton":
        logp, d_hidden, d_weight, d_bias = _kernels().weighted_nll_fwd(
            hidden, weight, bias, targets, valid, w, softcap, need_hidden, need_weight, need_bias)
    else:
        rows = _host_rows(valid)
        keep = _take(valid, rows)  # all True on the CPU
        h = _take(hidden, rows)  # [rows, D]
        if rows is None and valid.device.type != "cpu":
            h = torch.where(valid[:, None], h, 0)  # CUDA, every row kept: padding may hold inf/NaN
        t = torch.where(keep, _take(targets, rows), 0).contiguous()
        w_rows = _take(w, rows).contiguous()
        if backend == "cpp":
            from r3v_fast.ops import cpp_backend

            logp_rows, d_rows, d_weight, d_bias = cpp_backend.weighted_nll_fwd(
                _f32(h), _f32(weight), _f32(bias), t, w_rows, softcap, need_hidden, need_weight, need_bias)
            d_weight = None if d_weight is None else d_weight.to(weight.dtype)
            d_bias = None if d_bias is None else d_bias.to(bias.dtype)
        else:
            logp_rows, d_rows, d_weight, d_bias = reference.weighted_nll_fwd(
                h, weight, bias, t, w_rows, softcap, need_hidden, need_weight, need_bias)
        logp = _put(rows, logp_rows, n)
        d_hidden = None if d_rows is None else _put(rows, d_rows.to(hidden.dtype), n)
    logp = torch.where(valid, logp, 0.0)
    out_of_range = (targets != ignore_index) & ~valid
    logp = torch.where(out_of_range, float("nan"), logp)
    loss = (w.double() * logp.double()).sum().neg().float()  # fixed-order float64 sum; NaN if out of range
    return loss, logp, d_hidden, d_weight, d_bias


def scale_gradients_(grad: Tensor, tensors: list[Tensor], backend: str) -> None:
    """Each of ``tensors`` *= grad (0-dim), in place; no pass over the data when grad == 1.

    On the CPU the check is a plain read (no device to sync with); on CUDA the triton kernel
    makes it on the device, so that a loss used as is (grad 1) costs no pass over dW.
    """
    for t in tensors:
        if t.numel() == 0:
            continue
        if backend == "triton" or (t.device.type == "cuda" and triton_available()):
            _kernels().scale_(grad, t)
        elif t.device.type != "cpu" or float(grad) != 1.0:
            t.mul_(grad)
        # Whether or not it was written, the saved gradient is consumed: a second backward
        # through a retained graph then raises whatever the upstream gradient was.
        torch.autograd.graph.increment_version(t)
