"""Triton cascade decode attention: K branches of a question share one read of the prefix KV.

One decode step of shared-prefix sampling: every branch of a question has one new query token
and attends to [the question's prefix KV ; the branch's own suffix KV]. A program owns one
(question, KV head) pair and a block of BLOCK_M query rows; row r is branch r // G, query head
kv_head * G + r % G (GQA group G = H / Hkv). Its two phases share one online softmax:

1. prefix: the [BLOCK_M, Dh] query matrix times prefix key blocks (tl.dot), so the K branches
   x G heads read each prefix block once instead of K times;
2. suffix: for each branch of the row block, that branch's key blocks against the same query
   matrix with the other branches' rows masked out. The masked rows waste tensor-core FLOPs,
   but decode is bound by memory traffic, and each suffix key is still read once.

Split-K (split over the key length): with few questions the Q * Hkv programs do not fill the
GPU, so `num_splits` programs per (question, KV head) each take a 1/num_splits slice of the
prefix and of every suffix, write an fp32 partial (o, lse), and `_merge_attention_states_kernel`
merges the partials (the same LSE merge as prefix + suffix). With num_splits = 1 the kernel
writes the final output directly and there is no second pass.

Numerics: scores, softmax statistics and accumulation are fp32; exponentials are base 2 on
log2(e)-prescaled scores (the usual FlashAttention trick) and the LSE is converted to the
natural log on output, the one convention used across r3v_fast. fp32 inputs use IEEE dots (no
TF32). fp16/bf16 inputs feed the tensor cores natively on GPU; the probabilities are cast to
the value dtype for the P @ V dot, as in FlashAttention. Under TRITON_INTERPRET=1 everything
is upcast to fp32 right after tl.load (the interpreter has no bf16 arithmetic).

Paged variant (`_paged_cascade_decode_fwd_kernel`): the same two phases and split-K, with keys
and values in fixed-size blocks of one pool (the continuous-batching sampler's cache). A program
owns one (question row, KV head) pair; its query rows are the question's decode slots, gathered
through `question_slots`. Each key tile looks up the block of every key position in the block
table (position // KV_BLOCK) and reads that block's row (position % KV_BLOCK): rows of Dh
contiguous elements, so the reads stay coalesced whatever the block size. Prefix blocks are read
once per question, branch blocks once per branch. Slots that no question lists get o = 0.

Public entry points: `cascade_decode_fwd`, `paged_cascade_decode_fwd` (launchers) and
`merge_attention_states_fwd`. Shapes and conventions are documented in
r3v_fast.reference.cascade_attention.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(q, k_ptrs, v_ptrs, kv_mask, score_mask, m_i, l_i, acc, qk_scale,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one key block into the running (m_i, l_i, acc) of every query row (base 2)."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)                     # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)                     # [BLOCK_N, BLOCK_D]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale   # [BLOCK_M, BLOCK_N]
    s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; a finite stand-in avoids (-inf) - (-inf).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _cascade_decode_fwd_kernel(
    q_ptr, pk_ptr, pv_ptr, prefix_index_ptr, prefix_lens_ptr,
    sk_ptr, sv_ptr, suffix_lens_ptr, o_ptr, lse_ptr,
    stride_qq, stride_qb, stride_qh, stride_qd,
    stride_pkq, stride_pkh, stride_pkn, stride_pkd,
    stride_pvq, stride_pvh, stride_pvn, stride_pvd,
    stride_skq, stride_skb, stride_skh, stride_skn, stride_skd,
    stride_svq, stride_svb, stride_svh, stride_svn, stride_svd,
    stride_os, stride_oq, stride_ob, stride_oh, stride_od,
    stride_ls, stride_lq, stride_lb, stride_lh,
    num_kv_heads, num_branches, prefix_max, suffix_max, head_dim,
    prefix_chunk, suffix_chunk, qk_scale,
    GROUP: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_SUFFIX: tl.constexpr,
    HAS_PREFIX_INDEX: tl.constexpr, WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_qh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    question = (pid_qh // num_kv_heads).to(tl.int64)   # int64: offsets into large caches
    kv_head = pid_qh % num_kv_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                 # query rows of this block
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < num_branches * GROUP
    d_valid = offs_d < head_dim
    branch = offs_m // GROUP                                         # [BLOCK_M]
    head = kv_head * GROUP + offs_m % GROUP                          # [BLOCK_M]

    q_ptrs = (q_ptr + question * stride_qq + branch[:, None] * stride_qb
              + head[:, None] * stride_qh + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_PREFIX:
        slot = question
        if HAS_PREFIX_INDEX:
            slot = tl.load(prefix_index_ptr + question).to(tl.int64)
        prefix_len = tl.minimum(tl.load(prefix_lens_ptr + question), prefix_max)
        start = split * prefix_chunk
        end = tl.minimum(start + prefix_chunk, prefix_len)
        pk_base = pk_ptr + slot * stride_pkq + kv_head * stride_pkh + offs_d[None, :] * stride_pkd
        pv_base = pv_ptr + slot * stride_pvq + kv_head * stride_pvh + offs_d[None, :] * stride_pvd
        for n0 in range(start, end, BLOCK_N):
            n_valid = (n0 + offs_n) < end
            m_i, l_i, acc = _online_softmax_step(
                q, pk_base + (n0 + offs_n)[:, None] * stride_pkn,
                pv_base + (n0 + offs_n)[:, None] * stride_pvn,
                n_valid[:, None] & d_valid[None, :], n_valid[None, :],
                m_i, l_i, acc, qk_scale, UPCAST, DOT_PRECISION)

    if HAS_SUFFIX:
        # Only the branches that own rows of this block; each branch's keys are read once.
        first_branch = (pid_m * BLOCK_M) // GROUP
        last_branch = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, num_branches - 1)
        for b in range(first_branch, last_branch + 1):
            suffix_len = tl.minimum(tl.load(suffix_lens_ptr + question * num_branches + b),
                                    suffix_max)
            start = split * suffix_chunk
            end = tl.minimum(start + suffix_chunk, suffix_len)
            sk_base = (sk_ptr + question * stride_skq + b * stride_skb + kv_head * stride_skh
                       + offs_d[None, :] * stride_skd)
            sv_base = (sv_ptr + question * stride_svq + b * stride_svb + kv_head * stride_svh
                       + offs_d[None, :] * stride_svd)
            own_rows = branch == b
            for n0 in range(start, end, BLOCK_N):
                n_valid = (n0 + offs_n) < end
                m_i, l_i, acc = _online_softmax_step(
                    q, sk_base + (n0 + offs_n)[:, None] * stride_skn,
                    sv_base + (n0 + offs_n)[:, None] * stride_svn,
                    n_valid[:, None] & d_valid[None, :], own_rows[:, None] & n_valid[None, :],
                    m_i, l_i, acc, qk_scale, UPCAST, DOT_PRECISION)

    # A row with no key in this split (l = 0) yields o = 0, lse = -inf ("no contribution").
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = (o_ptr + split * stride_os + question * stride_oq + branch[:, None] * stride_ob
              + head[:, None] * stride_oh + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    if WRITE_LSE:
        # Natural-log LSE out: (base-2 max + log2 sum) * ln 2.
        lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        lse_ptrs = (lse_ptr + split * stride_ls + question * stride_lq + branch * stride_lb
                    + head * stride_lh)
        tl.store(lse_ptrs, lse, mask=row_valid)


@triton.jit
def _paged_cascade_decode_fwd_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, question_slots_ptr, prefix_tables_ptr, prefix_lens_ptr,
    slot_tables_ptr, slot_lens_ptr, o_ptr, lse_ptr,
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rr, stride_rw, stride_pr, stride_pb, stride_ts, stride_tb,
    stride_os, stride_oslot, stride_oh, stride_od,
    stride_ls, stride_lslot, stride_lh,
    num_kv_heads, width, prefix_cap, suffix_cap, head_dim,
    prefix_chunk, suffix_chunk, qk_scale,
    KV_BLOCK: tl.constexpr, GROUP: tl.constexpr, WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_rh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    row = (pid_rh // num_kv_heads).to(tl.int64)        # int64: offsets into large pools
    kv_head = pid_rh % num_kv_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                 # query rows of this block
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < width * GROUP
    d_valid = offs_d < head_dim
    branch = offs_m // GROUP                                         # [BLOCK_M]
    head = kv_head * GROUP + offs_m % GROUP                          # [BLOCK_M]
    slot = tl.load(question_slots_ptr + row * stride_rr + branch * stride_rw, mask=row_in,
                   other=-1).to(tl.int64)                            # [BLOCK_M]; -1 = no slot
    has_slot = slot >= 0
    slot_safe = tl.where(has_slot, slot, 0)

    q = tl.load(q_ptr + slot_safe[:, None] * stride_qs + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=has_slot[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = k_pool_ptr + kv_head * stride_kh + offs_d[None, :] * stride_kd
    v_head = v_pool_ptr + kv_head * stride_vh + offs_d[None, :] * stride_vd

    # 1. the question's prefix, read once for all its slots.
    prefix_len = tl.minimum(tl.load(prefix_lens_ptr + row), prefix_cap)
    start = split * prefix_chunk
    end = tl.minimum(start + prefix_chunk, prefix_len)
    table = prefix_tables_ptr + row * stride_pr
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_valid = pos < end
        block = tl.load(table + (pos // KV_BLOCK) * stride_pb, mask=n_valid, other=0).to(tl.int64)
        within = pos % KV_BLOCK
        m_i, l_i, acc = _online_softmax_step(
            q, k_head + block[:, None] * stride_kb + within[:, None] * stride_kn,
            v_head + block[:, None] * stride_vb + within[:, None] * stride_vn,
            n_valid[:, None] & d_valid[None, :], n_valid[None, :],
            m_i, l_i, acc, qk_scale, UPCAST, DOT_PRECISION)

    # 2. each slot's own tokens, only against that slot's query rows.
    first_branch = (pid_m * BLOCK_M) // GROUP
    last_branch = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, width - 1)
    for b in range(first_branch, last_branch + 1):
        own_slot = tl.load(question_slots_ptr + row * stride_rr + b * stride_rw).to(tl.int64)
        own_safe = tl.maximum(own_slot, 0)
        own_len = tl.minimum(tl.load(slot_lens_ptr + own_safe), suffix_cap)
        own_len = tl.where(own_slot >= 0, own_len, 0)
        start = split * suffix_chunk
        end = tl.minimum(start + suffix_chunk, own_len)
        table = slot_tables_ptr + own_safe * stride_ts
        own_rows = branch == b
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            n_valid = pos < end
            block = tl.load(table + (pos // KV_BLOCK) * stride_tb, mask=n_valid, other=0).to(tl.int64)
            within = pos % KV_BLOCK
            m_i, l_i, acc = _online_softmax_step(
                q, k_head + block[:, None] * stride_kb + within[:, None] * stride_kn,
                v_head + block[:, None] * stride_vb + within[:, None] * stride_vn,
                n_valid[:, None] & d_valid[None, :], own_rows[:, None] & n_valid[None, :],
                m_i, l_i, acc, qk_scale, UPCAST, DOT_PRECISION)

    # A row with no key in this split (l = 0) yields o = 0, lse = -inf ("no contribution").
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = (o_ptr + split * stride_os + slot_safe[:, None] * stride_oslot + head[:, None] * stride_oh
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=has_slot[:, None] & d_valid[None, :])
    if WRITE_LSE:
        lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + split * stride_ls + slot_safe * stride_lslot + head * stride_lh, lse,
                 mask=has_slot)


@triton.jit
def _merge_attention_states_kernel(
    o_parts_ptr, lse_parts_ptr, o_ptr, lse_ptr, num_states, head_dim,
    stride_ps, stride_pr, stride_pd, stride_lps, stride_lpr, stride_or, stride_od, stride_lr,
    WRITE_LSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge num_states partial states of one row: o = sum_s w_s o_s, w_s = softmax_s(lse_s)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_states
    lse = tl.load(lse_parts_ptr + offs_s * stride_lps + row * stride_lpr, mask=s_valid,
                  other=float("-inf")).to(tl.float32)                # [BLOCK_S]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)      # all empty: finite stand-in
    w = tl.exp(lse - lse_max)                                        # 0 for empty states
    total = tl.sum(w, 0)
    safe_total = tl.where(total > 0.0, total, 1.0)
    o_parts = tl.load(o_parts_ptr + offs_s[:, None] * stride_ps + row * stride_pr
                      + offs_d[None, :] * stride_pd,
                      mask=s_valid[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    # where() so that whatever an empty state holds in o (even nan) is ignored.
    o_parts = tl.where(w[:, None] > 0.0, o_parts.to(tl.float32), 0.0)
    o = tl.sum(o_parts * w[:, None], 0) / safe_total                 # [BLOCK_D]
    tl.store(o_ptr + row * stride_or + offs_d * stride_od, o.to(o_ptr.dtype.element_ty),
             mask=offs_d < head_dim)
    if WRITE_LSE:
        tl.store(lse_ptr + row * stride_lr,
                 tl.where(total > 0.0, lse_max + tl.log(safe_total), float("-inf")))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def auto_num_splits(device: torch.device, programs: int, max_keys: int) -> int:
    """Split the key length only when the (question, KV head, row block) programs underfill the
    GPU, and keep every split at least 256 keys long. Shape-only: no host sync. (Callers that
    know how many programs do real work, e.g. a sampler whose question table has empty rows,
    pass that count and give the result to the launcher as num_splits.)"""
    if device.type != "cuda" or _interpreting():
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs == 0 or programs >= sms:  # nothing to launch, or enough programs already
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), max_keys // 256, 32))


def _launch_config(rows: int, head_dim: int, upcast: bool) -> dict:
    """Block sizes and warps. tl.dot needs every dim >= 16. Past 64 query rows a second row block
    re-reads the prefix, which costs less than a 128-row accumulator's register spills. fp32
    (IEEE dots without tensor cores) needs small key blocks. These choices compile without
    register spills on sm_90 for Dh <= 256 (checked with ptxas -v)."""
    block_m = min(max(triton.next_power_of_2(rows), 16), 64)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    if _interpreting():
        return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    if not upcast:  # fp16 / bf16 on tensor cores
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d, num_warps=8, num_stages=2)
    return dict(BLOCK_M=min(block_m, 32) if block_d >= 256 else block_m, BLOCK_N=16,
                BLOCK_D=block_d, num_warps=8 if block_d >= 128 else 4, num_stages=2)


def cascade_decode_fwd(q, prefix_k=None, prefix_v=None, prefix_lens=None,
                       suffix_k=None, suffix_v=None, suffix_lens=None, *,
                       scale=None, prefix_index=None, num_splits=None, return_lse=False,
                       out_dtype=None):
    """Launch cascade decode attention. Either part (prefix or suffix) may be None.

    q [Q, K, H, Dh]; prefix_k/v [N, Hkv, P_max, Dh] + prefix_lens [Q] (+ prefix_index [Q]);
    suffix_k/v [Q, K, Hkv, S_max, Dh] + suffix_lens [Q, K]. Any strides are accepted. Returns
    (o [Q, K, H, Dh] in out_dtype (default q.dtype), lse [Q, K, H] fp32 or None).
    Inputs are assumed validated by r3v_fast.ops.cascade_attention.
    """
    num_q, num_branches, num_heads, head_dim = q.shape
    has_prefix, has_suffix = prefix_k is not None, suffix_k is not None
    kv = prefix_k if has_prefix else suffix_k
    num_kv_heads = kv.shape[-3]
    group = num_heads // num_kv_heads
    prefix_max = prefix_k.shape[2] if has_prefix else 0
    suffix_max = suffix_k.shape[3] if has_suffix else 0
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    device = q.device

    upcast = _interpreting() or q.dtype == torch.float32
    config = _launch_config(num_branches * group, head_dim, upcast)
    m_blocks = triton.cdiv(num_branches * group, config["BLOCK_M"])
    if num_splits is None:
        num_splits = auto_num_splits(device, num_q * num_kv_heads * m_blocks,
                                      max(prefix_max, suffix_max))
    block_n = config["BLOCK_N"]
    # Each split covers a whole number of key blocks.
    prefix_chunk = triton.cdiv(triton.cdiv(max(prefix_max, 1), num_splits), block_n) * block_n
    suffix_chunk = triton.cdiv(triton.cdiv(max(suffix_max, 1), num_splits), block_n) * block_n

    out = torch.empty(num_q, num_branches, num_heads, head_dim, device=device, dtype=out_dtype)
    lse = (torch.empty(num_q, num_branches, num_heads, device=device, dtype=torch.float32)
           if return_lse else None)
    if out.numel() == 0:
        return out, lse
    if num_splits == 1:
        o_dst, lse_dst, o_split_stride, lse_split_stride = out, lse, 0, 0
    else:
        # fp32 partial states, one per split; merged below.
        o_dst = torch.empty(num_splits, *out.shape, device=device, dtype=torch.float32)
        lse_dst = torch.empty(num_splits, *out.shape[:-1], device=device, dtype=torch.float32)
        o_split_stride, lse_split_stride = o_dst.stride(0), lse_dst.stride(0)
    o_strides = o_dst.stride()[-4:]
    lse_strides = lse_dst.stride()[-3:] if lse_dst is not None else (0, 0, 0)

    dummy = q  # placeholder pointer for absent parts (never dereferenced: constexpr-guarded)
    pk, pv = (prefix_k, prefix_v) if has_prefix else (dummy, dummy)
    sk, sv = (suffix_k, suffix_v) if has_suffix else (dummy, dummy)
    pk_strides = prefix_k.stride() if has_prefix else (0, 0, 0, 0)
    pv_strides = prefix_v.stride() if has_prefix else (0, 0, 0, 0)
    sk_strides = suffix_k.stride() if has_suffix else (0, 0, 0, 0, 0)
    sv_strides = suffix_v.stride() if has_suffix else (0, 0, 0, 0, 0)
    prefix_lens_i = prefix_lens.to(torch.int32).contiguous() if has_prefix else dummy
    suffix_lens_i = suffix_lens.to(torch.int32).contiguous() if has_suffix else dummy
    prefix_index_i = (prefix_index.to(torch.int32).contiguous()
                      if prefix_index is not None else dummy)

    grid = (num_q * num_kv_heads, m_blocks, num_splits)
    _cascade_decode_fwd_kernel[grid](
        q, pk, pv, prefix_index_i, prefix_lens_i, sk, sv, suffix_lens_i, o_dst,
        lse_dst if lse_dst is not None else out,
        *q.stride(), *pk_strides, *pv_strides, *sk_strides, *sv_strides,
        o_split_stride, *o_strides, lse_split_stride, *lse_strides,
        num_kv_heads, num_branches, prefix_max, suffix_max, head_dim,
        prefix_chunk, suffix_chunk, scale * _LOG2E,
        GROUP=group, HAS_PREFIX=has_prefix, HAS_SUFFIX=has_suffix,
        HAS_PREFIX_INDEX=prefix_index is not None, WRITE_LSE=lse_dst is not None,
        UPCAST=upcast, DOT_PRECISION="ieee" if upcast else "tf32",
        **config,
    )
    if num_splits > 1:
        merge_attention_states_fwd(o_dst.view(num_splits, -1, head_dim),
                                   lse_dst.view(num_splits, -1),
                                   out=out.view(-1, head_dim),
                                   lse_out=lse.view(-1) if lse is not None else None)
    return out, lse


def paged_cascade_decode_fwd(q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens,
                             slot_tables, slot_lens, *, scale=None, num_splits=None,
                             return_lse=False):
    """Launch paged cascade decode attention.

    q [S, H, Dh]; k_pool/v_pool [NB, Hkv, BS, Dh]; question_slots [R, W] (-1 = none);
    prefix_tables [R, MPB] + prefix_lens [R]; slot_tables [S, MSB] + slot_lens [S]. Returns
    (o [S, H, Dh] in q's dtype, 0 for unlisted slots; lse [S, H] fp32 or None). Inputs are
    assumed validated by r3v_fast.ops.cascade_attention.
    """
    num_slots, num_heads, head_dim = q.shape
    num_kv_heads, kv_block = k_pool.shape[1], k_pool.shape[2]
    group = num_heads // num_kv_heads
    num_rows, width = question_slots.shape
    prefix_cap = prefix_tables.shape[1] * kv_block
    suffix_cap = slot_tables.shape[1] * kv_block
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    device = q.device

    upcast = _interpreting() or q.dtype == torch.float32
    config = _launch_config(width * group, head_dim, upcast)
    m_blocks = triton.cdiv(width * group, config["BLOCK_M"])
    if num_splits is None:
        num_splits = auto_num_splits(device, num_rows * num_kv_heads * m_blocks, max(prefix_cap, suffix_cap))
    block_n = config["BLOCK_N"]
    prefix_chunk = triton.cdiv(triton.cdiv(max(prefix_cap, 1), num_splits), block_n) * block_n
    suffix_chunk = triton.cdiv(triton.cdiv(max(suffix_cap, 1), num_splits), block_n) * block_n

    # Slots that no question lists are never written by the kernel: 0 / -inf from the start.
    out = torch.zeros(num_slots, num_heads, head_dim, device=device, dtype=q.dtype)
    lse = (torch.full((num_slots, num_heads), float("-inf"), device=device, dtype=torch.float32)
           if return_lse else None)
    if out.numel() == 0 or num_rows == 0:
        return out, lse
    if num_splits == 1:
        o_dst, lse_dst, o_split_stride, lse_split_stride = out, lse, 0, 0
    else:
        # fp32 partial states, one per split, merged below; unwritten rows merge to (0, -inf).
        o_dst = torch.zeros(num_splits, *out.shape, device=device, dtype=torch.float32)
        lse_dst = torch.full((num_splits, *out.shape[:-1]), float("-inf"), device=device,
                             dtype=torch.float32)
        o_split_stride, lse_split_stride = o_dst.stride(0), lse_dst.stride(0)
    lse_strides = lse_dst.stride()[-2:] if lse_dst is not None else (0, 0)
    # int32 indices (no-ops for the sampler's cache, which keeps them int32 already).
    question_slots, prefix_tables, slot_tables = (t.to(torch.int32) for t in (question_slots, prefix_tables,
                                                                           slot_tables))
    prefix_lens, slot_lens = prefix_lens.to(torch.int32).contiguous(), slot_lens.to(torch.int32).contiguous()
    grid = (num_rows * num_kv_heads, m_blocks, num_splits)
    _paged_cascade_decode_fwd_kernel[grid](
        q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens, o_dst,
        lse_dst if lse_dst is not None else out,
        *q.stride(), *k_pool.stride(), *v_pool.stride(),
        *question_slots.stride(), *prefix_tables.stride(), *slot_tables.stride(),
        o_split_stride, *o_dst.stride()[-3:], lse_split_stride, *lse_strides,
        num_kv_heads, width, prefix_cap, suffix_cap, head_dim,
        prefix_chunk, suffix_chunk, scale * _LOG2E,
        KV_BLOCK=kv_block, GROUP=group, WRITE_LSE=lse_dst is not None, UPCAST=upcast,
        DOT_PRECISION="ieee" if upcast else "tf32", **config,
    )
    if num_splits > 1:
        merge_attention_states_fwd(o_dst.view(num_splits, -1, head_dim), lse_dst.view(num_splits, -1),
                                   out=out.view(-1, head_dim),
                                   lse_out=lse.view(-1) if lse is not None else None)
    return out, lse


def merge_attention_states_fwd(o_parts, lse_parts, *, out=None, lse_out=None):
    """Merge S partial states per row: o_parts [S, R, Dh], lse_parts [S, R] (natural log).

    Writes o into out [R, Dh] (allocated in o_parts' dtype if None) and, when lse_out [R] is
    given, the merged lse. Returns (out, lse_out).
    """
    num_states, num_rows, head_dim = o_parts.shape
    if out is None:
        out = torch.empty(num_rows, head_dim, device=o_parts.device, dtype=o_parts.dtype)
    if num_rows == 0:
        return out, lse_out
    _merge_attention_states_kernel[(num_rows,)](
        o_parts, lse_parts, out, lse_out if lse_out is not None else out, num_states, head_dim,
        *o_parts.stride(), *lse_parts.stride(), *out.stride(),
        lse_out.stride(0) if lse_out is not None else 0,
        WRITE_LSE=lse_out is not None, BLOCK_S=max(triton.next_power_of_2(num_states), 2),
        BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
    )
    return out, lse_out
