"""Backend choice and per-backend forward/backward of the fused token log-likelihood.

The registered ops in r3v_fast.ops.segment_logprob call only the three functions at the end
of this file; here they are routed to one of the backends (docs/architecture.md):

* "triton": kernels/segment_logprob.py. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  Sync-free compaction (stable sort + device-side count), deterministic segment sums.
* "cpp":    r3v_fast/ops/cpp_backend.py (C++ / OpenMP, CPU), when the extension is built.
* "torch":  r3v_fast/reference/segment_logprob.py, chunked pure PyTorch, anywhere.

"cpp" and "torch" share one contract (compacted fp32 inputs, all targets valid), so they
share the glue below: compact, upcast, call, scatter back, cast gradients to input dtypes.
On CPU tensors the compaction is ``nonzero`` (exact size; the CPU has no device to sync
with), so their cost scales with target tokens. The torch backend on CUDA tensors skips
compaction instead (all rows, masked), to stay free of host syncs: cost scales with T.

Backend choice ("auto", R3V_BACKEND, errors) is the shared rule of r3v_fast/ops/backend.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from r3v_fast.ops.backend import cpp_available, triton_available  # noqa: F401 (re-exported)
from r3v_fast.ops.backend import resolve_backend as _resolve
from r3v_fast.reference import segment_logprob as reference


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton" | "cpp" | "torch") for tensors on ``device``."""
    return _resolve("segment_logprob", backend, device)


def _kernels():
    from r3v_fast.kernels import segment_logprob as kernels

    return kernels


def _host_impl(backend: str):
    if backend == "cpp":
        from r3v_fast.ops import cpp_backend

        return cpp_backend
    return reference


def _valid(targets: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """[N] bool: targets that take part (not ignored, inside the vocabulary)."""
    return (targets != ignore_index) & (targets >= 0) & (targets < vocab)


def _host_rows(valid: Tensor) -> Tensor | None:
    """Rows the cpp/torch backends compute: the valid ones on CPU (None when that is every
    row: no gather, no scatter), every row (masked) elsewhere."""
    if valid.device.type == "cpu":
        rows = valid.nonzero()[:, 0]
        return None if rows.numel() == valid.numel() else rows
    return None


def _take(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t[rows]


def _put(rows: Tensor | None, values: Tensor, n: int) -> Tensor:
    """values [rows] scattered into zeros [n, ...] (identity when rows is every row)."""
    if rows is None:
        return values
    return values.new_zeros((n, *values.shape[1:])).index_copy_(0, rows, values)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def token_logprob_forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None,
                          ignore_index: int, softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    """(logp [N] f32, lse [N] f32) for hidden [N, D]. Ignored targets give logp 0; targets
    outside [0, V) that are not ignore_index give NaN (checking them would need a host sync)."""
    valid = _valid(targets, weight.shape[0], ignore_index)
    if backend == "triton":
        logp, lse = _kernels().token_logprob_fwd(hidden, weight, bias, targets, valid, softcap)
    else:
        rows = _host_rows(valid)
        keep = _take(valid, rows)  # all True on the CPU
        logp_rows, lse_rows = _host_impl(backend).token_logprob_fwd(
            _f32(_take(hidden, rows)), _f32(weight), _f32(bias),
            torch.where(keep, _take(targets, rows), 0).contiguous(), float(softcap))
        n = hidden.shape[0]
        logp = _put(rows, torch.where(keep, logp_rows, 0.0), n)
        lse = _put(rows, torch.where(keep, lse_rows, 0.0), n)
    out_of_range = (targets != ignore_index) & ~valid
    return torch.where(out_of_range, float("nan"), logp), lse


def token_logprob_backward(grad_logp: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
                           bias: Tensor | None, lse: Tensor, ignore_index: int, softcap: float, backend: str,
                           need_hidden: bool, need_weight: bool, need_bias: bool):
    """(dH [N, D] | None, dW [V, D] | None, dB [V] | None) in the inputs' dtypes."""
    valid = _valid(targets, weight.shape[0], ignore_index)
    if backend == "triton":
        return _kernels().token_logprob_bwd(hidden, weight, bias, targets, valid, lse, grad_logp, softcap,
                                            need_hidden, need_weight, need_bias)
    rows = _host_rows(valid)
    keep = _take(valid, rows)
    # Rows outside the compaction (CUDA torch path) get a zero upstream gradient: no effect.
    grad_rows = torch.where(keep, _take(grad_logp.to(torch.float32), rows), 0.0).contiguous()
    d_rows, d_weight, d_bias = _host_impl(backend).token_logprob_bwd(
        _f32(_take(hidden, rows)), _f32(weight), _f32(bias), torch.where(keep, _take(targets, rows), 0).contiguous(),
        _take(lse, rows).contiguous(), grad_rows, float(softcap), need_hidden, need_weight,
        need_bias and bias is not None)
    d_hidden = _put(rows, d_rows.to(hidden.dtype), hidden.shape[0]) if need_hidden else None
    return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))


def segment_sum(values: Tensor, segment_ids: Tensor, num_segments: int, backend: str) -> Tensor:
    """[num_segments] f32 per-segment sums; ids outside [0, num_segments) count nowhere."""
    if backend == "triton":
        return _kernels().segment_sum(values, segment_ids, num_segments)
    return reference.segment_sum(values, segment_ids, num_segments)
