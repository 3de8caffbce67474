"""Pure-PyTorch token log-likelihood, chunked over tokens: the "torch" backend of r3v_fast.ops.

Same contract as the C++ backend (r3v_fast/ops/cpp_backend.py): compacted fp32 inputs, every
target valid. Memory stays bounded: at most ``chunk_elements`` logits ([rows, V]) exist at a
time, never the full [T, V]. The backward recomputes each chunk's logits from the saved
log-sum-exp, so it is exact for any upstream gradient (no gradient precomputed in forward).

    z      = softcap·tanh((h·Wᵀ + b) / softcap)   (softcap 0: z = h·Wᵀ + b)
    logp_t = z[t] - logsumexp(z)
    dz0    = g·(onehot(t) - softmax(z))·(1 - (z/softcap)²)
    dH = dz0·W,  dW = dz0ᵀ·H,  dB = Σ_rows dz0

Everything runs in the inputs' dtype (fp32 from the dispatcher). On the CPU the results are
deterministic (sequential chunks, deterministic matmuls).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 logits per chunk


def _rows_per_chunk(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(vocab, 1))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float) -> torch.Tensor:
    z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)  # [rows, V]
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def token_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, softcap: float, *,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [N] and lse [N] for hidden [N, D], weight [V, D], bias [V] | None, targets [N] in [0, V)."""
    n = hidden.shape[0]
    logp = hidden.new_empty(n)
    lse = hidden.new_empty(n)
    step = _rows_per_chunk(weight.shape[0], chunk_elements)
    for start in range(0, n, step):
        z = _logits(hidden[start:start + step], weight, bias, softcap)  # [rows, V]
        z_max = z.max(dim=1).values  # [rows]
        # The sum of exp(z - max) accumulates in float64: an fp32 sum that is already ~1 drops
        # terms below half an ulp, the softmax tail of a peaked distribution. logp is
        # (z_t - max) - log(sum) rather than z_t - lse: lse ~ 20 carries an absolute rounding
        # of ~1e-6 that the difference would keep, while z_t - max is exact.
        log_sum = torch.log(torch.exp(z - z_max[:, None]).sum(dim=1, dtype=torch.float64)).to(z.dtype)  # [rows]
        z_target = z.gather(1, targets[start:start + step, None])[:, 0]  # [rows]
        logp[start:start + step] = (z_target - z_max) - log_sum
        lse[start:start + step] = z_max + log_sum
    return logp, lse


def token_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, softcap: float,
                      need_hidden: bool, need_weight: bool, need_bias: bool, *,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """(dH [N, D] | None, dW [V, D] | None, dB [V] | None) for upstream grad_logp [N]."""
    need_bias = need_bias and bias is not None
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = torch.zeros_like(weight) if need_weight else None
    d_bias = torch.zeros_like(bias) if need_bias else None
    if not (need_hidden or need_weight or need_bias):
        return d_hidden, d_weight, d_bias
    n = hidden.shape[0]
    step = _rows_per_chunk(weight.shape[0], chunk_elements)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        h = hidden[rows]  # [rows, D]
        z = _logits(h, weight, bias, softcap)  # [rows, V]
        grad_z = torch.exp(z - lse[rows, None]).neg_()  # -softmax
        grad_z.scatter_add_(1, targets[rows, None], torch.ones_like(grad_z[:, :1]))  # onehot - softmax
        grad_z.mul_(grad_logp[rows, None])
        if softcap > 0:
            grad_z.mul_(1 - (z / softcap).square())  # d softcap·tanh(x/softcap) / dx
        if need_hidden:
            d_hidden[rows] = grad_z @ weight
        if need_weight:
            d_weight.addmm_(grad_z.T, h)
        if need_bias:
            d_bias.add_(grad_z.sum(0))
    return d_hidden, d_weight, d_bias


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[num_segments] f32 sums of values [N] by segment id; ids outside [0, num_segments) count nowhere.

    Accumulates in float64 with index_add_: sequential, hence deterministic, on the CPU. (On
    CUDA index_add_ uses atomics; the triton backend has its own sort-based kernel.)
    """
    ids = segment_ids.to(torch.int64)
    in_range = (ids >= 0) & (ids < num_segments)
    out = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    if num_segments > 0:
        out.index_add_(0, torch.where(in_range, ids, 0), torch.where(in_range, values.to(torch.float64), 0.0))
    return out.to(torch.float32)
