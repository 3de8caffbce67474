"""Pure-PyTorch weighted token NLL with its gradients formed in the forward: the "torch" backend.

    L = -Σ_t w_t · log p(target_t | hidden_t),   z = softcap·tanh((h·Wᵀ + b) / softcap)
    G = dL/dz = w_t · (softmax(z) - onehot(target_t)) · (1 - (z / softcap)²)
    dH = G·W,  dW = Gᵀ·H,  dB = Σ_t G

The token weights are known before the forward, so each chunk of tokens goes logits → LSE →
G (in place) → dH rows and dW += ..., and nothing is recomputed: three matmuls, not the four
of token_logprob, whose backward must serve any upstream gradient (docs/architecture.md,
"Fused loss"). At most ``chunk_elements`` logits ([rows, V]) exist at a time.

Contract (shared with the C++ backend, r3v_fast/ops/cpp_backend.py): every target lies in
[0, V) and every hidden row is finite; rows that must not count carry weight 0 (their G row
is then exactly 0). Numerics: the matmuls run in the inputs' dtype (fp32 from the CPU
dispatcher); the softmax runs in fp32 with its exp-sum in float64, so the tail of a peaked
distribution is kept; G goes back to the compute dtype for the dH/dW matmuls, as the eager
logits gradient does. dW accumulates over chunks in fp32 whatever the weight dtype: a 16-bit
accumulator would round once per chunk, and this fallback favours accuracy over the [V, D]
fp32 buffer it costs. Deterministic on the CPU (sequential chunks, deterministic matmuls).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 logits per chunk


def _rows_per_chunk(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(vocab, 1))


def weighted_nll_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                     token_weights: Tensor, softcap: float, need_hidden: bool, need_weight: bool,
                     need_bias: bool, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """(logp [N] f32, dH [N, D] | None, dW [V, D] | None, dB [V] | None) of L = -Σ w·logp.

    hidden [N, D], weight [V, D], bias [V] | None, targets [N] in [0, V), token_weights [N].
    Gradients come back in the dtypes of hidden, weight and bias.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # matmul dtype
    w_mat = weight.to(dtype)  # a no-op unless the dtypes are mixed
    b_vec = None if bias is None else bias.to(dtype)
    need_bias = need_bias and bias is not None
    token_w = token_weights.to(torch.float32)
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
    step = _rows_per_chunk(vocab, chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        h = hidden[rows].to(dtype)  # [rows, D]
        z = h @ w_mat.T if b_vec is None else torch.addmm(b_vec, h, w_mat.T)  # [rows, V]
        z = z.float()  # a no-op for fp32
        if softcap > 0:
            z = torch.tanh(z.div_(softcap)).mul_(softcap)  # in place: one [rows, V] buffer
        t = targets[rows, None]  # [rows, 1]
        z_max = z.max(dim=1, keepdim=True).values  # [rows, 1]
        z_target = z.gather(1, t)  # [rows, 1]
        # softcap' = 1 - (z/cap)² needs the capped logits, which G overwrites: keep it first.
        slope = 1 - (z / softcap).square_() if softcap > 0 else None  # [rows, V] | None
        g = z.sub_(z_max).exp_()  # [rows, V], exp(z - max) in place
        # float64 sum: an fp32 sum of ~1 drops the softmax tail of a peaked distribution.
        log_sum = torch.log(g.sum(dim=1, keepdim=True, dtype=torch.float64)).float()  # [rows, 1]
        logp[rows] = ((z_target - z_max) - log_sum)[:, 0]  # z_t - max is exact; lse's rounding is not
        w_rows = token_w[rows, None]  # [rows, 1]
        g.mul_(torch.exp(-log_sum) * w_rows)  # w·softmax
        g.scatter_add_(1, t, -w_rows)  # w·(softmax - onehot)
        if slope is not None:
            g.mul_(slope)
        if need_bias:
            d_bias.add_(g.sum(0))
        g = g.to(dtype)  # the matmul operand, rounded as the eager logits gradient is
        if need_hidden:
            d_hidden[rows] = (g @ w_mat).to(hidden.dtype)
        if need_weight:  # fp32 products of the (rounded) operands, accumulated in fp32
            d_weight.addmm_(g.T.float(), h.float())
    return (logp, d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))
