"""Triton kernels of the fused token log-likelihood: LM-head matmul + log-softmax + target gather.

Used by ``r3v_fast.ops.segment_logprob`` (backend "triton"); no autograd or dispatch here.
The [tokens x vocab] logits are never stored whole:

* forward  ``_token_logprob_fwd_kernel``: one program per (token block, vocab split) streams
  the vocabulary in tiles, keeps an online logsumexp (running max m, running sum s) and picks
  up the target logit as it passes; the few vocab splits (enough programs to fill the GPU) are
  merged afterwards with a fixed-order logsumexp.
* backward, per vocab chunk (the chunk is sized so that its gradient tile stays small):
  ``_token_logprob_bwd_kernel`` recomputes the logits of the chunk and writes
  G = g * (onehot - softmax) * softcap' for the valid tokens; then two plain GEMM kernels
  ``_token_logprob_dw_kernel`` (dW[chunk] = Gᵀ·H, one program per dW tile looping over all
  tokens) and ``_token_logprob_dh_kernel`` (dH += G·W[chunk], one program per dH tile)
  consume it. With ``KernelConfig.dw_by_torch_mm`` (the 16-bit GPU default: on an H100 the
  vendor GEMM ran this product twice as fast as the Triton kernel) dW[chunk] is a torch.mm
  over all N compacted rows instead, with G and H zero past n_valid. Each output tile has a
  single owner and a fixed reduction order: no atomics, so results are bitwise reproducible
  run to run. Total work is the 8·T·D·V of forward + backward (the logits are recomputed
  once, in the G kernel).

Only target tokens cost work: the valid positions are compacted by a stable sort into a
static-size index (valid first) plus a device-side count ``n_valid``; programs past the count
return at once and the GEMM loops stop at it. Nothing reads the count on the host (no sync).

Numerics: dot products, logsumexp, dW, dB and dH accumulate in fp32 (tl.dot with fp32
accumulators; fp32 inputs use input_precision="ieee", not TF32). The logsumexp's running sum
is compensated (TwoSum per tile) and the vocab splits merge in float64, so the softmax tail of
a peaked distribution is not lost; logp is (z_target - max) - log(sum), exact when p -> 1. G is stored in the compute
dtype (bf16/fp16 as the eager path rounds its logits gradient; fp32 for fp32).
References: Liger-Kernel fused linear cross-entropy, Apple cut-cross-entropy (Wijmans et al.
2024), the Triton matmul tutorial (grouped program ordering).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes. Fixed per dtype (no autotuning: a timing-dependent pick would make the
    reduction order, hence the bits, differ between processes)."""

    block_t: int  # logits tiles (fwd and G kernels): tokens
    block_v: int  # vocab
    block_d: int  # hidden (reduction)
    dw_block: tuple[int, int, int]  # dW GEMM tiles: (vocab, hidden, tokens)
    dh_block: tuple[int, int, int]  # dH GEMM tiles: (tokens, hidden, vocab)
    num_warps: int
    num_stages: int
    group_m: int  # GEMM program grouping for L2 reuse
    programs_per_sm: int  # forward: split the vocab until about this many programs per SM
    chunk_bytes: int  # backward: bytes of the G chunk [tokens, chunk of vocab]
    max_chunk_cols: int  # backward: and at most this many vocab columns per chunk
    # backward: dW[chunk] = Gᵀ·H[rows] by the vendor GEMM (torch.mm) instead of the Triton
    # kernel. Costs N (not n_valid) tokens of work, since its shape must be known on the host,
    # and an [N, D] compacted copy of H; the G buffer then starts zeroed (rows past n_valid
    # are never written).
    dw_by_torch_mm: bool = False


# 16-bit tiles picked on an H100 (bench/profile_segment_logprob_gpu.py, Qwen2-VL-7B head; see
# bench/results/segment_logprob_profile.json): 128 x 256 logits tiles, 16 forward programs per
# SM (fewer leave a partial last wave), 128 x 256 dH tiles, and dW by cuBLAS, which ran at
# twice the rate of the Triton dW kernel (~13 vs ~24 ms) even when paying for all N rows.
GPU_CONFIG_16BIT = KernelConfig(128, 256, 64, (128, 128, 64), (128, 256, 64), 8, 3, 8, 16, 64 << 20, 1 << 30,
                                dw_by_torch_mm=True)
GPU_CONFIG_32BIT = KernelConfig(64, 64, 32, (64, 64, 32), (64, 64, 32), 4, 2, 8, 4, 64 << 20, 1 << 30)
# The interpreter pays per tl op, not per element: few large tiles, yet small enough that the
# odd test shapes (T 47, D 123, V 507) span several token, vocab and hidden blocks, two vocab
# splits in the forward and two vocab chunks in the backward.
INTERPRETER_CONFIG = KernelConfig(32, 128, 64, (128, 128, 32), (32, 128, 128), 4, 1, 4, 4, 64 << 20, 256)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype fed to tl.dot: the inputs' common dtype (mixed inputs promote, cast in-kernel).
    The interpreter has no bf16 arithmetic, so bf16 is upcast to fp32 there."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if dtype not in _TL_DTYPES:
        raise TypeError(f"triton backend: unsupported dtype {dtype} (hidden {hidden.dtype}, weight {weight.dtype})")
    if dtype == torch.bfloat16 and interpreting():
        dtype = torch.float32
    return dtype


def default_config(dtype: torch.dtype) -> KernelConfig:
    if interpreting():
        return INTERPRETER_CONFIG
    return GPU_CONFIG_32BIT if dtype == torch.float32 else GPU_CONFIG_16BIT


def compact(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid positions first, in order, as a static-size permutation, plus their count.

    Sync-free replacement for ``valid.nonzero()``: a stable argsort of the 0/1 "invalid" key.
    Returns rows [N] int64 (rows[:n_valid] are the valid positions) and n_valid [1] int32
    on the device.
    """
    rows = torch.argsort((~valid).to(torch.int32), stable=True)  # [N]
    n_valid = valid.sum(dtype=torch.int32).reshape(1)  # [1], stays on the device
    return rows, n_valid


@triton.jit
def _tanh(x):
    # tanh from exp (the interpreter has no libdevice); exp(-2|x|) <= 1 never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _two_sum(s, x, c):
    """(s', c') with s' + c' = s + x + c: Knuth's error-free TwoSum of s + x, its rounding
    error added to the compensation c. A tile's partial sum added straight into a running sum
    of ~1 loses everything below half an ulp: the softmax tail of a peaked distribution
    (2.5% of 1 - p at V = 151,936 over 128-wide tiles). Exact in any operand order."""
    t = s + x
    x_part = t - s
    err = (s - (t - x_part)) + (x - x_part)
    return t, c + err


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, mask_t, offs_v, mask_v, D, stride_hn, stride_hd, stride_wv,
                 stride_wd, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 COMPUTE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z[BLOCK_T, BLOCK_V] = softcap(h[rows] · w[offs_v]ᵀ + b), accumulated in fp32."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_hn  # rows are int64: no overflow for large T·D
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(h.to(COMPUTE), tl.trans(w.to(COMPUTE)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _token_logprob_fwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, n_valid_ptr, part_ptr, N, V, D,
                              blocks_per_split, n_splits, stride_hn, stride_hd, stride_wv, stride_wd,
                              softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                              COMPUTE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial (max, sum of exp, target logit) of one token block over one vocab split.

    part_ptr: [3, n_splits, N] fp32 in compacted token order. Token blocks vary fastest in
    the program id, so programs running together share the same weight tiles in L2.
    """
    pid = tl.program_id(0)
    t_blocks = tl.cdiv(N, BLOCK_T)
    pid_t = pid % t_blocks
    split = pid // t_blocks
    n_valid = tl.load(n_valid_ptr)
    if pid_t * BLOCK_T >= n_valid:
        return
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_valid
    rows = tl.load(rows_ptr + offs_t, mask=mask_t, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=mask_t, other=-1)
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)  # running sum of exp(z - m), compensated by c
    c = tl.zeros((BLOCK_T,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_T,), dtype=tl.float32)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + blocks_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, mask_t, offs_v, mask_v, D, stride_hn, stride_hd,
                         stride_wv, stride_wd, softcap, HAS_BIAS, HAS_SOFTCAP, COMPUTE, PRECISION,
                         BLOCK_T, BLOCK_V, BLOCK_D)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        # The target logit is taken from the fp32 tile, before any rounding.
        z_target += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a valid column
        scale = tl.exp(m - m_new)
        s, c = _two_sum(s * scale, tl.sum(tl.exp(z - m_new[:, None]), axis=1), c * scale)
        m = m_new
    out = part_ptr + split * N + offs_t
    tl.store(out, m, mask=mask_t)
    tl.store(out + n_splits * N, s + c, mask=mask_t)
    tl.store(out + 2 * n_splits * N, z_target, mask=mask_t)


@triton.jit
def _token_logprob_bwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, n_valid_ptr, lse_ptr, grad_ptr, g_ptr,
                              N, D, v_start, chunk_len, stride_hn, stride_hd, stride_wv, stride_wd,
                              stride_gn, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                              COMPUTE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """G[i, c] = dlogp/dz0 for compacted token i and vocab column v_start + c (recomputed z).
    Rows i >= n_valid are never written.

    With z = softcap·tanh(z0/softcap): dlogp/dz = g·(onehot - p), p = exp(z - lse), and
    dz/dz0 = 1 - tanh² = 1 - (z/softcap)².
    """
    pid = tl.program_id(0)
    t_blocks = tl.cdiv(N, BLOCK_T)
    pid_t = pid % t_blocks
    pid_v = pid // t_blocks
    n_valid = tl.load(n_valid_ptr)
    if pid_t * BLOCK_T >= n_valid:
        return
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_valid
    rows = tl.load(rows_ptr + offs_t, mask=mask_t, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=mask_t, other=-1)
    lse = tl.load(lse_ptr + rows, mask=mask_t, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=mask_t, other=0.0)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_c = offs_c < chunk_len
    offs_v = v_start + offs_c
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, mask_t, offs_v, mask_c, D, stride_hn, stride_hd,
                     stride_wv, stride_wd, softcap, HAS_BIAS, HAS_SOFTCAP, COMPUTE, PRECISION,
                     BLOCK_T, BLOCK_V, BLOCK_D)
    p = tl.exp(z - lse[:, None])
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    gz = grad[:, None] * (onehot - p)
    if HAS_SOFTCAP:
        tanh_z = z / softcap
        gz = gz * (1.0 - tanh_z * tanh_z)
    g_out = g_ptr + offs_t.to(tl.int64)[:, None] * stride_gn + offs_c[None, :]
    tl.store(g_out, gz.to(g_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Triton-tutorial program ordering: GROUP_M rows of tiles at a time, for L2 reuse."""
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % size_m, (pid % group_size) // size_m


@triton.jit
def _token_logprob_dw_kernel(g_ptr, h_ptr, rows_ptr, n_valid_ptr, dw_ptr, db_ptr, D, v_start, chunk_len,
                             stride_gn, stride_hn, stride_hd, stride_dwv, HAS_DW: tl.constexpr,
                             HAS_DB: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    """dW[v_start + m, n] = Σ_i G[i, m] · H[rows[i], n] (and dB = Σ_i G[i, m]) over valid i.

    One program owns one dW tile and loops over all valid tokens in order: deterministic,
    fp32 accumulation, written once in the weight dtype.
    """
    num_n = 1
    if HAS_DW:
        num_n = tl.cdiv(D, BLOCK_N)
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(chunk_len, BLOCK_M), num_n, GROUP_M)
    n_valid = tl.load(n_valid_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < chunk_len
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, n_valid, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n_valid
        g = tl.load(g_ptr + offs_k.to(tl.int64)[:, None] * stride_gn + offs_m[None, :],
                    mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        if HAS_DW:
            rows = tl.load(rows_ptr + offs_k, mask=mask_k, other=0)
            h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_n[None, :] * stride_hd,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(tl.trans(g.to(COMPUTE)), h.to(COMPUTE), acc, input_precision=PRECISION)
        if HAS_DB:
            db += tl.sum(g.to(tl.float32), axis=0)
    out_m = (v_start + offs_m).to(tl.int64)
    if HAS_DW:
        tl.store(dw_ptr + out_m[:, None] * stride_dwv + offs_n[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    if HAS_DB:
        tl.store(db_ptr + out_m, db.to(db_ptr.dtype.element_ty), mask=mask_m & (pid_n == 0))


@triton.jit
def _token_logprob_dh_kernel(g_ptr, w_ptr, rows_ptr, n_valid_ptr, acc_ptr, dh_ptr, N, D, v_start, chunk_len,
                             stride_gn, stride_wv, stride_wd, stride_acc, stride_dhn, IS_FIRST: tl.constexpr,
                             IS_LAST: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    """dH[rows[i], n] += Σ_c G[i, c] · W[v_start + c, n] for valid i.

    Across vocab chunks the partial sum lives in an fp32 buffer (compacted order) owned by
    this tile's program; the last chunk casts and scatters it to the token's row of dH.
    """
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    n_valid = tl.load(n_valid_ptr)
    if pid_m * BLOCK_M >= n_valid:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_valid
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    mask_out = mask_m[:, None] & mask_n[None, :]
    acc_ptrs = acc_ptr + offs_m.to(tl.int64)[:, None] * stride_acc + offs_n[None, :]
    if IS_FIRST:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.load(acc_ptrs, mask=mask_out, other=0.0)
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gn
    for k0 in range(0, chunk_len, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < chunk_len
        g = tl.load(g_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + (v_start + offs_k).to(tl.int64)[:, None] * stride_wv + offs_n[None, :] * stride_wd,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(g.to(COMPUTE), w.to(COMPUTE), acc, input_precision=PRECISION)
    if IS_LAST:
        rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
        tl.store(dh_ptr + rows[:, None] * stride_dhn + offs_n[None, :], acc.to(dh_ptr.dtype.element_ty),
                 mask=mask_out)
    else:
        tl.store(acc_ptrs, acc, mask=mask_out)


@triton.jit
def _segment_sum_kernel(values_ptr, bounds_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[s] = Σ values[bounds[s]:bounds[s+1]] (values sorted by segment): fixed order, no atomics."""
    seg = tl.program_id(0)
    start = tl.load(bounds_ptr + seg)
    end = tl.load(bounds_ptr + seg + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(values_ptr + offs, mask=offs < end, other=0.0)
    tl.store(out_ptr + seg, tl.sum(acc, axis=0))


def _dot_args(dtype: torch.dtype, cfg: KernelConfig) -> dict:
    # fp32 inputs: exact fp32 products ("ieee"), never TF32's 10-bit mantissa.
    return dict(COMPUTE=_TL_DTYPES[dtype], PRECISION="ieee" if dtype == torch.float32 else "tf32",
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def token_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, valid: torch.Tensor, softcap: float,
                      config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [N] f32 (0 where not valid) and lse [N] f32 for hidden [N, D], weight [V, D].

    targets [N] int64 must lie in [0, V) wherever ``valid`` [N] bool is set.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    targets = targets.contiguous()  # hidden and weight go in with their strides; these need unit stride
    bias = None if bias is None else bias.contiguous()
    dtype = compute_dtype(hidden, weight)
    cfg = config or default_config(dtype)
    rows, n_valid = compact(valid)
    t_blocks, v_blocks = triton.cdiv(n, cfg.block_t), triton.cdiv(v, cfg.block_v)
    # Split the vocabulary so that the grid fills the GPU even for few token blocks.
    n_splits = max(1, min(v_blocks, triton.cdiv(cfg.programs_per_sm * _num_sms(hidden.device), max(t_blocks, 1))))
    blocks_per_split = triton.cdiv(v_blocks, n_splits)
    n_splits = triton.cdiv(v_blocks, blocks_per_split)
    part = torch.empty((3, n_splits, n), dtype=torch.float32, device=hidden.device)  # m, s, z_target
    if n > 0:
        _token_logprob_fwd_kernel[(t_blocks * n_splits,)](
            hidden, weight, bias if bias is not None else weight, targets, rows, n_valid, part,
            n, v, d, blocks_per_split, n_splits, *hidden.stride(), *weight.stride(), float(softcap),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v,
            BLOCK_D=cfg.block_d, **_dot_args(dtype, cfg))
    m, s, z_target = part.unbind(0)  # each [n_splits, N]
    # Fixed-order merge of the splits. logp = (z_target - max) - log(sum), not z_target - lse:
    # lse ~ 20-30 carries an absolute rounding of ~2e-6 that the difference would keep, while
    # z_target - max is exact (0 when the target is the max).
    # The few split sums add in float64 ([n_splits, N]: cheap), so that no split's tail is lost.
    m_all = m.max(dim=0).values  # [N]
    log_sum = torch.log((s.double() * torch.exp(m - m_all).double()).sum(dim=0)).float()  # [N]
    lse_c = m_all + log_sum
    logp_c = (z_target.sum(0) - m_all) - log_sum  # only one split holds the target logit; the others add 0
    keep = torch.arange(n, device=hidden.device) < n_valid  # compacted slots past n_valid hold garbage
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    logp.scatter_(0, rows, torch.where(keep, logp_c, 0.0))  # rows is a permutation: every slot written once
    lse.scatter_(0, rows, torch.where(keep, lse_c, 0.0))
    return logp, lse


def token_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
                      softcap: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                      config: KernelConfig | None = None):
    """(dH [N, D] in hidden.dtype | None, dW [V, D] in weight.dtype | None, dB [V] | None)."""
    n, d = hidden.shape
    v = weight.shape[0]
    need_bias = need_bias and bias is not None
    d_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else None
    d_bias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if need_bias else None
    if n == 0:  # no token: dH is empty, dW and dB are zero
        for grad in (d_weight, d_bias):
            if grad is not None:
                grad.zero_()
    if n == 0 or not (need_hidden or need_weight or need_bias):
        return d_hidden, d_weight, d_bias
    dtype = compute_dtype(hidden, weight)
    cfg = config or default_config(dtype)
    rows, n_valid = compact(valid)
    targets, lse = targets.contiguous(), lse.contiguous()
    bias = None if bias is None else bias.contiguous()
    grad_logp = grad_logp.to(torch.float32).contiguous()
    # Vocab chunk: a multiple of every vocab tile, G [N, chunk] within the byte budget.
    unit = max(cfg.block_v, cfg.dw_block[0], cfg.dh_block[2])
    chunk = cfg.chunk_bytes // (max(n, 1) * torch.finfo(dtype).bits // 8) // unit * unit
    chunk = max(unit, min(chunk, cfg.max_chunk_cols // unit * unit, triton.cdiv(v, unit) * unit))
    n_chunks = triton.cdiv(v, chunk)
    dw_by_mm = cfg.dw_by_torch_mm and need_weight and not need_bias
    # [N, chunk]. The G kernel never writes rows past n_valid; the mm over all N rows needs
    # them 0 (not stale memory, which may hold NaN), so that buffer starts zeroed, once.
    g_buf = (torch.zeros if dw_by_mm else torch.empty)((n, chunk), dtype=dtype, device=hidden.device)
    hidden_c = None
    if dw_by_mm:
        # H in compacted order, the mm's B operand, in the compute dtype (mixed inputs promote).
        # Rows past n_valid are zeroed as well: 0 * (NaN/inf in an ignored position's hidden
        # state) would otherwise reach dW.
        past_valid = (torch.arange(n, device=hidden.device) >= n_valid)[:, None]  # [N, 1]
        hidden_c = hidden.index_select(0, rows).to(dtype)  # [N, D], a fresh tensor
        hidden_c.masked_fill_(past_valid, 0.0)  # in place: no second [N, D] buffer
    # fp32 partial dH across chunks (compacted order); one chunk needs none.
    dh_acc = torch.empty((n, d), dtype=torch.float32, device=hidden.device) if need_hidden and n_chunks > 1 else g_buf
    common = _dot_args(dtype, cfg)
    t_blocks = triton.cdiv(n, cfg.block_t)
    for index, v_start in enumerate(range(0, v, chunk)):
        chunk_len = min(chunk, v - v_start)
        _token_logprob_bwd_kernel[(t_blocks * triton.cdiv(chunk_len, cfg.block_v),)](
            hidden, weight, bias if bias is not None else weight, targets, rows, n_valid, lse, grad_logp, g_buf,
            n, d, v_start, chunk_len, *hidden.stride(), *weight.stride(), g_buf.stride(0), float(softcap),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v,
            BLOCK_D=cfg.block_d, **common)
        if dw_by_mm:
            # dW[chunk] = Gᵀ·H_c, rows past n_valid of G are 0. fp32 accumulation inside the
            # GEMM, one rounding to the weight dtype; deterministic for a given GPU and shape.
            g_chunk = g_buf[:, :chunk_len]  # [N, chunk_len]
            if d_weight.dtype == dtype:
                torch.mm(g_chunk.T, hidden_c, out=d_weight[v_start:v_start + chunk_len])
            else:
                d_weight[v_start:v_start + chunk_len] = torch.mm(g_chunk.T, hidden_c)
        elif need_weight or need_bias:
            bm, bn, bk = cfg.dw_block
            grid = triton.cdiv(chunk_len, bm) * (triton.cdiv(d, bn) if need_weight else 1)
            _token_logprob_dw_kernel[(grid,)](
                g_buf, hidden, rows, n_valid, d_weight if need_weight else g_buf, d_bias if need_bias else g_buf,
                d, v_start, chunk_len, g_buf.stride(0), *hidden.stride(), d if not need_weight else d_weight.stride(0),
                HAS_DW=need_weight, HAS_DB=need_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
                **common)
        if need_hidden:
            bm, bn, bk = cfg.dh_block
            _token_logprob_dh_kernel[(triton.cdiv(n, bm) * triton.cdiv(d, bn),)](
                g_buf, weight, rows, n_valid, dh_acc, d_hidden, n, d, v_start, chunk_len, g_buf.stride(0),
                *weight.stride(), dh_acc.stride(0), d_hidden.stride(0), IS_FIRST=index == 0,
                IS_LAST=index == n_chunks - 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m, **common)
    return d_hidden, d_weight, d_bias


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[num_segments] f32 sums of values [N] f32 by segment id; ids outside [0, S) count nowhere.

    Deterministic on the GPU (index_add_ would use float atomics): a stable sort by id, the
    segment bounds by searchsorted (static shapes, no sync), one program per segment.
    """
    out = torch.empty(num_segments, dtype=torch.float32, device=values.device)
    if num_segments == 0:
        return out
    ids = segment_ids.to(torch.int64)
    key = torch.where((ids >= 0) & (ids < num_segments), ids, num_segments)  # [N], out of range -> S
    order = torch.argsort(key, stable=True)
    sorted_values = values.to(torch.float32)[order].contiguous()
    bounds = torch.searchsorted(key[order], torch.arange(num_segments + 1, device=values.device))  # [S + 1]
    _segment_sum_kernel[(num_segments,)](sorted_values, bounds, out, BLOCK=64 if interpreting() else 1024)
    return out
