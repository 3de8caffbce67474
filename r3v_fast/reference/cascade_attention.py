"""Pure-PyTorch cascade decode attention: the oracle for the Triton kernel and the CPU backend.

Shared-prefix sampling decodes K branches of one question against a single copy of the
question's prefix KV cache (image + prompt) plus each branch's own suffix KV (the tokens the
branch generated). For one decode step, attention over [prefix; suffix] splits exactly into
two partial attentions whose results merge by log-sum-exp (FlashInfer's "cascade inference",
Ye et al. 2024; the same algebra as FlashAttention's online softmax):

    o = (e^{lse_p} o_p + e^{lse_s} o_s) / (e^{lse_p} + e^{lse_s}),  lse = log(e^{lse_p} + e^{lse_s})

The prefix partial is matrix-shaped: for one question and one KV head, the K branches x G
query heads of the group (G = H / Hkv, GQA) form a [K*G, Dh] query matrix that reads the
prefix once. The naive baseline (`naive_decode_attention`) instead gives every branch its
own copy of [prefix; suffix], reading the prefix K times.

Conventions shared with r3v_fast.ops.cascade_attention and kernels/cascade_attention.py:
- q [Q, K, H, Dh]: one new query token per branch (Q questions x K branches).
- prefix_k/v [N, Hkv, P_max, Dh] with prefix_lens [Q]; question q reads slot
  prefix_index[q] (default q), so several batches (sampling, the select prompt) can share one
  pool of prefixes.
- suffix_k/v [Q, K, Hkv, S_max, Dh] with suffix_lens [Q, K] (0 = empty suffix).
- Lengths are clamped to [0, buffer length]; positions at or past a length are padding.
- LSE is the natural-log log-sum-exp of the scaled scores; an empty key set gives o = 0 and
  lse = -inf, which the merge treats as "no contribution".
- Numerics: everything is computed in float32 (float64 inputs stay float64); o of partial
  states is returned in that compute dtype so merging does not round twice.

Paged layout (`paged_cascade_decode_attention`, the continuous-batching sampler's cache): the
keys and values of every prefix and every branch live in fixed-size blocks of one pool, and
block tables say which blocks hold a sequence's tokens, in order:
- q [S, H, Dh]: one query per decode slot;
- k_pool/v_pool [NB, Hkv, BS, Dh]: NB blocks of BS tokens;
- question_slots [R, W] int: the slots of question row r (-1 = none); a slot appears at most
  once; slots listed nowhere get o = 0, lse = -inf;
- prefix_tables [R, MPB] int, prefix_lens [R]: token t of row r's prefix is at
  block prefix_tables[r, t // BS], offset t % BS;
- slot_tables [S, MSB] int, slot_lens [S]: the same for each slot's own tokens.
Lengths are clamped to the table's capacity (blocks x BS).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 inputs are upcast: softmax statistics and accumulation are fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _length_mask(lens: Tensor, max_len: int) -> Tensor:
    """[...] lengths -> [..., max_len] bool, True at valid positions (lengths clamped)."""
    positions = torch.arange(max_len, device=lens.device)
    return positions < lens.clamp(0, max_len).unsqueeze(-1)


def _masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float):
    """q [..., M, Dh], k/v [..., N, Dh], valid [..., 1, N] (broadcast over the batch dims)
    -> o [..., M, Dh], lse [..., M]. A row without valid keys gets o = 0, lse = -inf."""
    batch, (m_rows, head_dim), n_keys = q.shape[:-2], q.shape[-2:], k.shape[-2]
    # Fold batch dims into views for bmm: bmm reads k transposed by strides, where a
    # many-dim matmul would copy it.
    q3 = (q * scale).reshape(-1, m_rows, head_dim)                  # [B, M, Dh] (q is small)
    k3, v3 = k.reshape(-1, n_keys, head_dim), v.reshape(-1, n_keys, head_dim)
    valid3 = valid.expand(*batch, 1, n_keys).reshape(-1, 1, n_keys)  # [B, 1, N]
    # Padding may hold anything (an unwritten cache slot can be nan): mask the values as well
    # as the scores, since 0 * nan = nan.
    v3 = torch.where(valid3.transpose(1, 2), v3, 0.0)               # one pass (masked_fill clones first)
    scores = torch.bmm(q3, k3.transpose(1, 2)).masked_fill_(~valid3, float("-inf"))  # [B, M, N]
    row_max = scores.amax(-1, keepdim=True)
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)        # no key: finite stand-in
    probs = scores.sub_(row_max).exp_()                             # in place: [B, M, N]
    row_sum = probs.sum(-1, keepdim=True)                           # [B, M, 1]; 0 if no key
    o = torch.bmm(probs, v3) / torch.where(row_sum > 0, row_sum, 1.0)
    lse = (row_max + row_sum.log()).squeeze(-1)                     # log 0 = -inf if no key
    return o.view(*batch, m_rows, head_dim), lse.view(*batch, m_rows)


def prefix_attention(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_lens: Tensor, *,
                     scale: float | None = None, prefix_index: Tensor | None = None):
    """Partial attention of every branch query over its question's shared prefix.

    Returns o [Q, K, H, Dh] and lse [Q, K, H] in the compute dtype (float32 or float64).
    """
    num_q, num_branches, num_heads, head_dim = q.shape
    num_kv_heads, p_max = prefix_k.shape[1], prefix_k.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    dtype = _compute_dtype(q.dtype)
    if prefix_index is not None:
        prefix_k, prefix_v = prefix_k[prefix_index.long()], prefix_v[prefix_index.long()]
    # One [K*G, Dh] query matrix per (question, KV head): the prefix is read once for all K.
    q_mat = (q.to(dtype).view(num_q, num_branches, num_kv_heads, group, head_dim)
             .permute(0, 2, 1, 3, 4).reshape(num_q, num_kv_heads, num_branches * group, head_dim))
    valid = _length_mask(prefix_lens, p_max)[:, None, None, :]      # [Q, 1, 1, P_max]
    o, lse = _masked_softmax_attention(q_mat, prefix_k.to(dtype), prefix_v.to(dtype), valid, scale)
    # [Q, Hkv, K*G, Dh] -> [Q, K, H, Dh] (head h = kv_head * G + g, as in repeat_interleave).
    o = o.view(num_q, num_kv_heads, num_branches, group, head_dim).permute(0, 2, 1, 3, 4)
    lse = lse.view(num_q, num_kv_heads, num_branches, group).permute(0, 2, 1, 3)
    return (o.reshape(num_q, num_branches, num_heads, head_dim),
            lse.reshape(num_q, num_branches, num_heads))


def suffix_attention(q: Tensor, suffix_k: Tensor, suffix_v: Tensor, suffix_lens: Tensor, *,
                     scale: float | None = None):
    """Partial attention of every branch query over its own suffix KV.

    Returns o [Q, K, H, Dh] and lse [Q, K, H] in the compute dtype; an empty suffix gives
    o = 0, lse = -inf.
    """
    num_q, num_branches, num_heads, head_dim = q.shape
    num_kv_heads, s_max = suffix_k.shape[2], suffix_k.shape[3]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    dtype = _compute_dtype(q.dtype)
    q_grp = q.to(dtype).view(num_q, num_branches, num_kv_heads, group, head_dim)
    valid = _length_mask(suffix_lens, s_max)[:, :, None, None, :]   # [Q, K, 1, 1, S_max]
    o, lse = _masked_softmax_attention(q_grp, suffix_k.to(dtype), suffix_v.to(dtype), valid, scale)
    return (o.reshape(num_q, num_branches, num_heads, head_dim),
            lse.reshape(num_q, num_branches, num_heads))


def merge_attention_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor):
    """Merge two partial attention states over disjoint key sets (natural-log LSE).

    o_* [..., Dh], lse_* [...]. A side with lse = -inf (no keys) contributes nothing; when both
    are empty the result is o = 0, lse = -inf. Returns o in o_a's dtype, lse in float32
    (float64 if the inputs are float64).
    """
    dtype = torch.promote_types(_compute_dtype(o_a.dtype), _compute_dtype(lse_a.dtype))
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    lse_max = torch.maximum(lse_a, lse_b)
    lse_max = torch.where(torch.isinf(lse_max), 0.0, lse_max)       # both empty: finite stand-in
    w_a, w_b = torch.exp(lse_a - lse_max), torch.exp(lse_b - lse_max)
    total = w_a + w_b
    safe_total = torch.where(total > 0, total, 1.0)
    # where() rather than multiplication so that garbage (even nan) in an empty side's o is ignored.
    o = (torch.where(w_a.unsqueeze(-1) > 0, o_a.to(dtype), 0.0) * (w_a / safe_total).unsqueeze(-1)
         + torch.where(w_b.unsqueeze(-1) > 0, o_b.to(dtype), 0.0) * (w_b / safe_total).unsqueeze(-1))
    lse = torch.where(total > 0, lse_max + torch.log(safe_total), float("-inf"))
    return o.to(o_a.dtype), lse


def cascade_decode_attention(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_lens: Tensor,
                             suffix_k: Tensor, suffix_v: Tensor, suffix_lens: Tensor, *,
                             scale: float | None = None, prefix_index: Tensor | None = None,
                             return_lse: bool = False):
    """Cascade decode attention: shared-prefix partial + per-branch suffix partial, LSE-merged.

    Returns o [Q, K, H, Dh] in q's dtype (and lse [Q, K, H] float32 if return_lse).
    """
    o_p, lse_p = prefix_attention(q, prefix_k, prefix_v, prefix_lens, scale=scale,
                                  prefix_index=prefix_index)
    o_s, lse_s = suffix_attention(q, suffix_k, suffix_v, suffix_lens, scale=scale)
    o, lse = merge_attention_states(o_p, lse_p, o_s, lse_s)
    return (o.to(q.dtype), lse) if return_lse else o.to(q.dtype)


def naive_decode_attention(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_lens: Tensor,
                           suffix_k: Tensor, suffix_v: Tensor, suffix_lens: Tensor, *,
                           scale: float | None = None, prefix_index: Tensor | None = None):
    """Baseline: each branch attends to its own copy of [prefix; suffix] (K copies of the prefix).

    This is what K independent `generate` sequences compute; kept for equivalence tests and
    benchmarks. Returns o [Q, K, H, Dh] in q's dtype.
    """
    num_q, num_branches, num_heads, head_dim = q.shape
    num_kv_heads, p_max, s_max = prefix_k.shape[1], prefix_k.shape[2], suffix_k.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    dtype = _compute_dtype(q.dtype)
    if prefix_index is not None:
        prefix_k, prefix_v = prefix_k[prefix_index.long()], prefix_v[prefix_index.long()]
    # [Q, K, Hkv, P_max + S_max, Dh]: the prefix is materialized once per branch.
    expand = (num_q, num_branches, num_kv_heads, p_max, head_dim)
    k_full = torch.cat([prefix_k.unsqueeze(1).expand(expand), suffix_k], dim=3).to(dtype)
    v_full = torch.cat([prefix_v.unsqueeze(1).expand(expand), suffix_v], dim=3).to(dtype)
    valid = torch.cat([_length_mask(prefix_lens, p_max)[:, None, :].expand(num_q, num_branches, p_max),
                       _length_mask(suffix_lens, s_max)], dim=-1)  # [Q, K, P_max + S_max]
    group = num_heads // num_kv_heads
    q_grp = q.to(dtype).view(num_q, num_branches, num_kv_heads, group, head_dim)
    o, _ = _masked_softmax_attention(q_grp, k_full, v_full, valid[:, :, None, None, :], scale)
    return o.reshape(num_q, num_branches, num_heads, head_dim).to(q.dtype)


def _gather_blocks(pool: Tensor, tables: Tensor) -> Tensor:
    """pool [NB, Hkv, BS, Dh], tables [..., B] -> [..., Hkv, B * BS, Dh]: the tokens of each table
    row in order (a copy). index_select copies whole blocks: on the CPU several times faster
    than advanced indexing, which computes an offset per element."""
    blocks = pool.index_select(0, tables.reshape(-1).long()).view(*tables.shape, *pool.shape[1:])
    blocks = blocks.movedim(-3, -4)                                 # [..., Hkv, B, BS, Dh]
    return blocks.reshape(*blocks.shape[:-3], -1, blocks.shape[-1])


def _own_token_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, slot_tables: Tensor, lens: Tensor,
                         scale: float):
    """Partial attention of each slot's query over its own tokens, touching valid tokens only.

    q [S, H, Dh]; lens [S] (0 for slots that read nothing). The T = sum(lens) tokens are
    gathered into one flat list ([T, Hkv, Dh]), scored against their slot's query and reduced
    per slot with a segment softmax (max by scatter_reduce, sums by index_add), so a single long
    branch does not make every slot's work as wide as its own. T is read on the host (the size
    of the gathered arrays): a device sync on CUDA, where the Triton kernel is the path.
    Returns o [S, H, Dh] and lse [S, H] in the compute dtype; no token gives (0, -inf).
    """
    num_slots, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_pool.shape[1], k_pool.shape[2]
    group = num_heads // num_kv_heads
    dtype, device = _compute_dtype(q.dtype), q.device
    seg = torch.repeat_interleave(torch.arange(num_slots, device=device), lens)   # [T] slot of each token
    pos = torch.arange(seg.numel(), device=device) - (torch.cumsum(lens, 0) - lens)[seg]
    block = slot_tables.long()[seg, pos // block_size]                            # [T]
    # Row of (token, KV head) in the pool viewed as [NB * Hkv * BS, Dh]: whole-row copies.
    heads = torch.arange(num_kv_heads, device=device)
    rows = ((block[:, None] * num_kv_heads + heads) * block_size + (pos % block_size)[:, None]).reshape(-1)
    keys = k_pool.reshape(-1, head_dim).index_select(0, rows).view(-1, num_kv_heads, head_dim).to(dtype)
    values = v_pool.reshape(-1, head_dim).index_select(0, rows).view(-1, num_kv_heads, head_dim).to(dtype)
    queries = q.to(dtype).view(num_slots, num_kv_heads, group, head_dim).index_select(0, seg)  # [T, Hkv, G, Dh]
    # A product and a sum rather than einsum, which would run T * Hkv tiny matrix products.
    scores = (queries * keys[:, :, None]).sum(-1) * scale                         # [T, Hkv, G]
    row_max = torch.full((num_slots, num_kv_heads, group), float("-inf"), dtype=dtype, device=device)
    row_max = row_max.scatter_reduce(0, seg[:, None, None].expand_as(scores), scores, "amax")
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)                     # no key: finite stand-in
    probs = torch.exp(scores - row_max[seg])                                      # [T, Hkv, G]
    row_sum = torch.zeros_like(row_max).index_add_(0, seg, probs)                 # [S, Hkv, G]; 0 if no key
    o = torch.zeros(num_slots, num_kv_heads, group, head_dim, dtype=dtype, device=device)
    o.index_add_(0, seg, probs[..., None] * values[:, :, None])                    # [S, Hkv, G, Dh]
    o = o / torch.where(row_sum > 0, row_sum, 1.0)[..., None]
    lse = row_max + row_sum.log()                                                 # log 0 = -inf: no key
    return o.view(num_slots, num_heads, head_dim), lse.view(num_slots, num_heads)


def paged_cascade_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, question_slots: Tensor,
                                   prefix_tables: Tensor, prefix_lens: Tensor, slot_tables: Tensor,
                                   slot_lens: Tensor, *, scale: float | None = None,
                                   return_lse: bool = False):
    """Cascade decode attention over a block pool (layout in the module docstring).

    Prefix: each question row's slots form a [W*G, Dh] query matrix per KV head that reads the
    row's prefix blocks once (``prefix_attention`` on the gathered prefix). Own tokens: per slot,
    valid tokens only (``_own_token_attention``). The two partial states merge by log-sum-exp.

    Returns o [S, H, Dh] in q's dtype (0 for slots no question lists) and, if return_lse,
    lse [S, H] float32 (-inf for those slots).
    """
    num_slots, num_heads, head_dim = q.shape
    block_size = k_pool.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    listed = question_slots >= 0                                                  # [R, W]
    slots = question_slots.long().clamp_min(0)                                    # [R, W]
    o_rows, lse_rows = prefix_attention(q[slots], _gather_blocks(k_pool, prefix_tables),
                                        _gather_blocks(v_pool, prefix_tables), prefix_lens,
                                        scale=scale)                              # [R, W, H, Dh], [R, W, H]
    o_prefix = torch.zeros(num_slots, num_heads, head_dim, dtype=o_rows.dtype, device=q.device)
    lse_prefix = torch.full((num_slots, num_heads), float("-inf"), dtype=lse_rows.dtype, device=q.device)
    o_prefix[slots[listed]] = o_rows[listed]
    lse_prefix[slots[listed]] = lse_rows[listed]
    has = torch.zeros(num_slots, dtype=torch.bool, device=q.device)
    has[slots[listed]] = True
    own_lens = torch.where(has, slot_lens.long().clamp(0, slot_tables.shape[1] * block_size), 0)
    o_own, lse_own = _own_token_attention(q, k_pool, v_pool, slot_tables, own_lens, scale)
    o, lse = merge_attention_states(o_prefix, lse_prefix, o_own, lse_own)
    return (o.to(q.dtype), lse.float()) if return_lse else o.to(q.dtype)
