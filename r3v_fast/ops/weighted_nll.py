"""Weighted token NLL with the gradients formed in the forward: ``weighted_nll``.

    weighted_nll(hidden [*, D], weight [V, D], targets [*], token_weights [*]) -> loss [] f32
    loss = -Σ_t w_t · log p(targets[t] | hidden[t]),  p = softmax(softcap(hidden·weightᵀ + bias))

The training loss of R³V and of any SFT trainer: the weight of every token is known before
the forward (the token mean 1/n, per-task means, 1/num_items_in_batch), so dL/dlogits =
w·(softmax - onehot) is formed as soon as a chunk's log-sum-exp is known, and the gradients
of hidden, weight and bias are computed during the forward: three 2·T·D·V products instead
of the four of ``token_logprob`` (whose backward must serve any upstream gradient: keep it
for DPO-style sequence log-probabilities), two when the LM head is frozen (LoRA). The
backward only multiplies the stored gradients by the scalar upstream gradient, in place
(docs/architecture.md, "Fused loss").

Registered with torch.library as a custom op with a fake kernel and an autograd formula,
opaque to torch.compile (fullgraph works), checked with torch.library.opcheck:

    r3v::weighted_nll(hidden, weight, targets, token_weights, bias, ignore_index, softcap,
                      backend, need_hidden, need_weight, need_bias) -> (loss, logp, dH, dW, dB)

The backward scales dH, dW, dB by the upstream gradient in place in eager mode (while a graph
is traced, as an ordinary product: a graph may not write into its saved tensors).

The token log-probabilities the op computes anyway come back on request, detached, per token
or summed per segment (``return_logprobs``): the per-task NLL a trainer logs costs nothing
extra. No host synchronisation in forward or backward; deterministic; backends in
r3v_fast/ops/weighted_nll_backends.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from r3v_fast.ops import weighted_nll_backends as backends
from r3v_fast.ops.segment_logprob import _check, _prepare

__all__ = ["weighted_nll"]

_OP = "weighted_nll"


# ---------------------------------------------------------------- r3v::weighted_nll
@torch.library.custom_op("r3v::weighted_nll", mutates_args=())
def _weighted_nll_op(hidden: Tensor, weight: Tensor, targets: Tensor, token_weights: Tensor, bias: Optional[Tensor],
                     ignore_index: int, softcap: float, backend: str, need_hidden: bool, need_weight: bool,
                     need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, logp, *grads = backends.weighted_nll_forward(hidden, weight, targets, token_weights, bias, ignore_index,
                                                       softcap, backend, need_hidden, need_weight, need_bias)
    # custom ops return tensors only: a gradient not asked for is a fresh empty tensor.
    return (loss, logp, *(hidden.new_empty(0) if g is None else g for g in grads))


@_weighted_nll_op.register_fake
def _(hidden, weight, targets, token_weights, bias, ignore_index, softcap, backend, need_hidden, need_weight,
      need_bias):
    n = hidden.shape[0]
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_bias and bias is not None else hidden.new_empty(0))


# ---------------------------------------------------------------- autograd
def _traced(t: Tensor) -> bool:
    """True while torch.compile / AOTAutograd / opcheck trace the backward: a graph may not
    write into the tensors its forward saved, so there the product is an ordinary graph op."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))
            or torch._is_functional_tensor(t))


def _setup(ctx, inputs, output):
    _, _, _, _, _, _, _, backend, *_ = inputs
    _, logp, d_hidden, d_weight, d_bias = output
    ctx.save_for_backward(logp, d_hidden, d_weight, d_bias)
    ctx.backend = backend
    ctx.mark_non_differentiable(logp, d_hidden, d_weight, d_bias)
    # Outputs without a gradient reach the backward as None, not as zero tensors: autograd
    # would otherwise allocate and fill a zero dW and dH for it (a second gradient buffer).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_logp, _grad_dh, _grad_dw, _grad_db):
    if grad_loss is None:  # only the non-differentiable outputs were used
        return (None,) * 11
    logp, d_hidden, d_weight, d_bias = ctx.saved_tensors
    need_hidden, need_weight, _, need_token_weights, need_bias = ctx.needs_input_grad[:5]
    if _traced(grad_loss):
        # Functional: Inductor may write the product over the saved buffer, which is dead here.
        d_hidden, d_weight, d_bias = (g * grad_loss for g in (d_hidden, d_weight, d_bias))
    else:
        # Eager: in place, no second gradient-sized buffer, and no pass at all when the upstream
        # gradient is 1 (checked on the device). The saved tensors' version counters move, so a
        # second backward through a retained graph raises instead of scaling twice.
        backends.scale_gradients_(grad_loss, [d_hidden, d_weight, d_bias], ctx.backend)
    d_token_weights = -grad_loss * logp if need_token_weights else None  # dL/dw_t = -logp_t
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, None, d_token_weights,
            d_bias if need_bias else None, None, None, None, None, None, None)


_weighted_nll_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- public function
def weighted_nll(hidden: Tensor, weight: Tensor, targets: Tensor, token_weights: Tensor, *,
                 bias: Tensor | None = None, ignore_index: int = -100, softcap: float | None = None,
                 backend: str = "auto", return_logprobs: bool = False, segment_ids: Tensor | None = None,
                 num_segments: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """-Σ_t token_weights[t] · log p(targets[t] | hidden[t]): a 0-dim float32 tensor.

    hidden [*, D] (leading dims flattened into T, any strides), weight [V, D], targets [*]
    integer, token_weights [*] float (same shape as targets), bias [V] | None; softcap c:
    logits -> c·tanh(logits / c). Tokens whose target is ``ignore_index`` count nowhere,
    whatever their weight. Examples: the token mean is token_weights = mask / mask.sum();
    HF's gradient-accumulation loss is mask / num_items_in_batch.

    Differentiable in hidden, weight, bias (gradients computed in the forward, only for the
    inputs that require grad) and token_weights (d/dw_t = -logp_t). The loss is float32.

    return_logprobs: also return the token log-probabilities computed on the way, detached:
    logp [T] float32 (0 at ignored tokens) or, with ``segment_ids`` [*] and ``num_segments``,
    their per-segment sums [num_segments] (ids outside [0, num_segments) count nowhere), e.g.
    per-task NLL for logging. Returns ``(loss, logprobs)`` then.
    """
    hidden_2d, targets_1d, cap, backend = _prepare(hidden, weight, targets, bias, ignore_index, softcap,
                                                   backend, op=_OP)
    _check(isinstance(token_weights, Tensor) and token_weights.is_floating_point()
           and token_weights.numel() == targets_1d.numel() and token_weights.shape in (targets.shape,
                                                                                   targets_1d.shape),
           f"token_weights must be a floating tensor shaped like targets {tuple(targets.shape)}, got "
           f"{getattr(token_weights, 'dtype', type(token_weights).__name__)} "
           f"{tuple(getattr(token_weights, 'shape', ()))}", _OP)
    _check(token_weights.device == hidden.device, f"token_weights is on {token_weights.device}, hidden on "
           f"{hidden.device}", _OP)
    _check(segment_ids is None or return_logprobs, "segment_ids only shape the returned log-probabilities: "
           "pass return_logprobs=True", _OP)
    if segment_ids is not None:
        _check(isinstance(num_segments, int) and num_segments >= 0,
               f"num_segments must be an int >= 0 with segment_ids, got {num_segments!r}", _OP)
        _check(isinstance(segment_ids, Tensor) and segment_ids.numel() == targets_1d.numel()
               and not segment_ids.is_floating_point() and segment_ids.dtype != torch.bool
               and segment_ids.device == hidden.device,
               f"segment_ids must be an integer tensor shaped like targets on {hidden.device}", _OP)
    grad = torch.is_grad_enabled()
    need_hidden = grad and hidden.requires_grad
    need_weight = grad and weight.requires_grad
    need_bias = grad and bias is not None and bias.requires_grad
    loss, logp, *_ = torch.ops.r3v.weighted_nll(hidden_2d, weight, targets_1d, token_weights.reshape(-1), bias,
                                                ignore_index, cap, backend, need_hidden, need_weight, need_bias)
    if not return_logprobs:
        return loss
    if segment_ids is None:
        return loss, logp
    return loss, torch.ops.r3v.segment_sum(logp, segment_ids.reshape(-1).to(torch.int64), num_segments, backend)
