"""Fused masked multi-segment log-likelihood: ``token_logprob`` and ``segment_logprob``.

One op for the training loss of R³V (SFT, refine and select targets in one batch), DPO-style
sequence log-probabilities and plain SFT: LM-head matmul, log-softmax, target gather and
per-segment sums, forward and backward, without ever storing the [tokens x vocab] logits.

    token_logprob(hidden [*, D], weight [V, D], targets [*])            -> logp [T] f32
    segment_logprob(..., segment_ids [*], num_segments)                  -> sums [S] f32

Registered with torch.library (docs/architecture.md, "Ops and backends") as three custom ops, opaque to torch.compile
(fullgraph works) and checked with torch.library.opcheck:

    r3v::token_logprob(hidden, weight, targets, bias, ignore_index, softcap, backend) -> (logp, lse)
    r3v::token_logprob_backward(grad_logp, ..., need_hidden, need_weight, need_bias) -> (dH, dW, dB)
    r3v::segment_sum(values, segment_ids, num_segments, backend) -> sums

The backward recomputes the logits from the saved log-sum-exp ([T] floats), so it is exact
for any upstream gradient: in R³V the per-segment weights are only known after the forward.
Gradients not requested are not computed (an unused output comes back as an empty tensor
and is mapped to None). No host synchronisation anywhere in forward or backward; backends,
compaction and determinism are described in r3v_fast/ops/segment_logprob_backends.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from r3v_fast.ops import segment_logprob_backends as backends
from r3v_fast.ops.backend import resolve_backend

__all__ = ["token_logprob", "segment_logprob"]


# ---------------------------------------------------------------- r3v::token_logprob
@torch.library.custom_op("r3v::token_logprob", mutates_args=())
def _token_logprob_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                      ignore_index: int, softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    return backends.token_logprob_forward(hidden, weight, targets, bias, ignore_index, softcap, backend)


@_token_logprob_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, softcap, backend):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("r3v::token_logprob_backward", mutates_args=())
def _token_logprob_backward_op(grad_logp: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
                               bias: Optional[Tensor], lse: Tensor, ignore_index: int, softcap: float,
                               backend: str, need_hidden: bool, need_weight: bool,
                               need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = backends.token_logprob_backward(grad_logp, hidden, weight, targets, bias, lse, ignore_index,
                                            softcap, backend, need_hidden, need_weight, need_bias)
    # custom ops return tensors only: a gradient not asked for is a fresh empty tensor.
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@_token_logprob_backward_op.register_fake
def _(grad_logp, hidden, weight, targets, bias, lse, ignore_index, softcap, backend, need_hidden,
      need_weight, need_bias):
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_bias and bias is not None else hidden.new_empty(0))


def _token_logprob_setup(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, softcap, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    ctx.config = (ignore_index, softcap, backend)
    ctx.mark_non_differentiable(output[1])


def _token_logprob_backward(ctx, grad_logp, _grad_lse):
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    need_bias = need_bias and bias is not None
    d_hidden, d_weight, d_bias = torch.ops.r3v.token_logprob_backward(
        grad_logp, hidden, weight, targets, bias, lse, *ctx.config, need_hidden, need_weight, need_bias)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, None,
            d_bias if need_bias else None, None, None, None)


_token_logprob_op.register_autograd(_token_logprob_backward, setup_context=_token_logprob_setup)


# ---------------------------------------------------------------- r3v::segment_sum
@torch.library.custom_op("r3v::segment_sum", mutates_args=())
def _segment_sum_op(values: Tensor, segment_ids: Tensor, num_segments: int, backend: str) -> Tensor:
    return backends.segment_sum(values, segment_ids, num_segments, backend)


@_segment_sum_op.register_fake
def _(values, segment_ids, num_segments, backend):
    return values.new_empty(num_segments, dtype=torch.float32)


def _segment_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_segments = inputs[2]


def _segment_sum_backward(ctx, grad):
    (segment_ids,) = ctx.saved_tensors
    num_segments = ctx.num_segments
    in_range = (segment_ids >= 0) & (segment_ids < num_segments)
    if num_segments == 0:
        return torch.zeros_like(segment_ids, dtype=torch.float32), None, None, None
    per_token = grad[segment_ids.clamp(0, num_segments - 1)]  # [N] gather: deterministic
    return torch.where(in_range, per_token, 0.0), None, None, None


_segment_sum_op.register_autograd(_segment_sum_backward, setup_context=_segment_sum_setup)


# ---------------------------------------------------------------- public functions
def _check(cond: bool, message: str, op: str = "segment_logprob") -> None:
    if not cond:
        raise ValueError(f"{op}: {message}")


def _prepare(hidden, weight, targets, bias, ignore_index, softcap, backend, op="segment_logprob"):
    """Validate shapes/dtypes (no data reads on CUDA), flatten, resolve the backend.

    Shared by every LM-head op (``op`` names it in errors and in the backend choice)."""
    def check(cond, message):  # errors name the calling op
        _check(cond, message, op)

    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check(isinstance(t, Tensor), f"{name} must be a Tensor, got {type(t).__name__}")
    check(hidden.dim() >= 1 and hidden.is_floating_point(),
          f"hidden must be a floating tensor [*, D], got {hidden.dtype} {tuple(hidden.shape)}")
    check(weight.dim() == 2 and weight.is_floating_point(),
          f"weight must be a floating tensor [V, D], got {weight.dtype} {tuple(weight.shape)}")
    vocab, dim = weight.shape
    check(vocab > 0 and dim > 0, f"weight must be non-empty [V, D], got {tuple(weight.shape)}")
    check(hidden.shape[-1] == dim, f"hidden last dim {hidden.shape[-1]} != weight dim D={dim}")
    check(not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool,
          f"targets must be an integer tensor, got {targets.dtype}")
    check(targets.shape == hidden.shape[:-1] or (targets.dim() == 1 and targets.numel() * dim == hidden.numel()),
          f"targets shape {tuple(targets.shape)} does not match hidden {tuple(hidden.shape)} leading dims")
    if bias is not None:
        check(isinstance(bias, Tensor) and tuple(bias.shape) == (vocab,) and bias.is_floating_point(),
              f"bias must be a floating tensor [V={vocab}], got {getattr(bias, 'shape', bias)}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        check(t is None or t.device == hidden.device, f"{name} is on {t.device if t is not None else ''}, "
              f"hidden on {hidden.device}")
    check(softcap is None or softcap > 0, f"softcap must be None or > 0, got {softcap}")
    hidden_2d = hidden.reshape(-1, dim)  # [T, D]; a view (any strides) whenever possible
    targets_1d = targets.reshape(-1).to(torch.int64)  # [T]
    if targets_1d.device.type == "cpu" and not torch.compiler.is_compiling():
        # Cheap on the CPU (no device to sync with); on CUDA such targets give NaN instead.
        bad = ((targets_1d != ignore_index) & ((targets_1d < 0) | (targets_1d >= vocab))).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{op}: targets[{i}] = {int(targets_1d[i])} is outside the vocabulary "
                             f"[0, {vocab}) and is not ignore_index={ignore_index} ({bad.numel()} such tokens)")
    return hidden_2d, targets_1d, float(softcap or 0.0), resolve_backend(op, backend, hidden.device)


def token_logprob(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                  ignore_index: int = -100, softcap: float | None = None, backend: str = "auto") -> Tensor:
    """log p(targets[t] | hidden[t]) under softmax(softcap(hidden·weightᵀ + bias)): Tensor[T] float32.

    hidden [*, D] (leading dims flattened into T, any strides), weight [V, D], targets [*]
    integer, bias [V] | None. softcap c: logits -> c·tanh(logits / c). Positions whose target
    is ``ignore_index`` give 0 and cost no work. Differentiable in hidden, weight and bias;
    the output is float32 whatever the input dtype (fp32 accumulation throughout).
    """
    hidden_2d, targets_1d, cap, backend = _prepare(hidden, weight, targets, bias, ignore_index, softcap, backend)
    logp, _ = torch.ops.r3v.token_logprob(hidden_2d, weight, targets_1d, bias, ignore_index, cap, backend)
    return logp


def segment_logprob(hidden: Tensor, weight: Tensor, targets: Tensor, segment_ids: Tensor, num_segments: int,
                    *, bias: Tensor | None = None, ignore_index: int = -100, softcap: float | None = None,
                    backend: str = "auto") -> Tensor:
    """Σ of token log-probabilities per segment: Tensor[num_segments] float32.

    segment_ids [*] integer, same shape as targets, in any order. A token counts in segment
    segment_ids[t] when that id is in [0, num_segments) and its target is not ignore_index;
    other tokens count nowhere and cost no work. An empty segment gives 0.
    """
    hidden_2d, targets_1d, cap, backend = _prepare(hidden, weight, targets, bias, ignore_index, softcap, backend)
    _check(isinstance(num_segments, int) and num_segments >= 0,
           f"num_segments must be an int >= 0, got {num_segments!r}")
    _check(isinstance(segment_ids, Tensor) and segment_ids.numel() == targets_1d.numel()
           and segment_ids.shape in (targets.shape, targets_1d.shape),
           f"segment_ids shape {tuple(getattr(segment_ids, 'shape', ()))} != targets shape {tuple(targets.shape)}")
    _check(not segment_ids.is_floating_point() and segment_ids.dtype != torch.bool,
           f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    _check(segment_ids.device == hidden.device, f"segment_ids is on {segment_ids.device}, hidden on {hidden.device}")
    segment_ids_1d = segment_ids.reshape(-1).to(torch.int64)  # [T]
    in_segment = (segment_ids_1d >= 0) & (segment_ids_1d < num_segments)
    targets_1d = torch.where(in_segment, targets_1d, ignore_index)  # outside every segment: skipped
    logp, _ = torch.ops.r3v.token_logprob(hidden_2d, weight, targets_1d, bias, ignore_index, cap, backend)
    return torch.ops.r3v.segment_sum(logp, segment_ids_1d, num_segments, backend)
