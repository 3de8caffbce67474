"""Triton side of the weighted token NLL with gradients formed in the forward (GPU backend).

Used by ``r3v_fast.ops.weighted_nll`` (backend "triton"); no autograd or dispatch here.
L = -Σ_t w_t·log p(target_t) with known weights, so dL/dz = w_t·(softmax - onehot) can be
formed as soon as a token's log-sum-exp is known. Per chunk of tokens (docs/architecture.md,
"Fused loss"):

    logits chunk  Z = H_c·Wᵀ (+ b)           torch.mm / cuBLAS, [chunk, V] in the compute dtype
    ``_weighted_nll_fwd_kernel``              one program per token row: online log-sum-exp
                                              (pass 1), then G = w·(p - onehot)·softcap'
                                              written over Z in place (pass 2); logp[t]
    dH rows       G·W                         torch.mm
    dW           += Gᵀ·H_c                    torch.addmm (the first chunk writes)
    dB           += Σ_rows G

Three products of 2·T·D·V and no recompute (token_logprob needs four: its backward serves any
upstream gradient); two when dW is not wanted (frozen LM head, LoRA). The GEMMs are the
vendor's (as Liger-Kernel does): on an H100 cuBLAS ran ~10% above our best Triton GEMM tile.
``_weighted_nll_scale_kernel`` is the backward: the stored gradients times the scalar upstream
gradient, in place, skipped on the device when that gradient is exactly 1 (no host sync).

Memory: besides the gradients, one [chunk, V] buffer and one [chunk, D] copy of hidden rows.
Ignored rows are zeroed in that copy (non-finite hidden states at padding never reach a
product) and carry weight 0, so their G row is exactly 0; all T rows go through the GEMMs
(their count is known on the host only as T: compaction would need a sync).

Numerics: the GEMMs accumulate in fp32 and round the logits and G to the compute dtype, as the
eager path does. The row kernel upcasts right after each load; its log-sum-exp runs in fp32
with a compensated (TwoSum) running sum, so the softmax tail of a peaked distribution is kept.
With 16-bit logits the target logit is recomputed in fp32 (a D-long dot per token) and
replaces its rounded value in both passes: the loss of a confidently right token is then
accurate, not off by the logit's rounding (~|z|·2⁻⁹). dW accumulates over chunks in the weight
dtype: one rounding per chunk (an fp32 accumulator would double the op's memory). A bf16
simulation (T = 8192, D = 64, V = 2048) gave a dW error of 1.5e-2 in 256-token chunks,
8.8e-3 in 512 and 3.6e-3 in one (the eager GEMM), against the 1e-2 bf16 floor: hence
512-token chunks, at the cost of a 156 MB buffer (1.14x the gradients instead of 1.1x);
the GPU profile measures both at the real shape.
Deterministic: fixed chunk order, a fixed-order row kernel and deterministic GEMMs.
References: Liger-Kernel fused linear cross-entropy; Apple cut-cross-entropy (Wijmans et al. 2024).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from r3v_fast.kernels.segment_logprob import _tanh, _two_sum, compute_dtype


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Fixed per dtype (no autotuning: a timing-dependent pick would change the bits)."""

    chunk_tokens: int  # tokens per chunk: the [chunk, V] buffer and the dW rounding count
    block_v: int  # vocabulary elements per step of the row kernel
    block_d: int  # hidden elements per step of the exact target-logit dot
    num_warps: int


# GPU: 512 tokens per chunk in 16 bits ([512, 151,936] bf16 = 156 MB beside 1.15 GB of
# gradients for the Qwen2-VL-7B head; 16 roundings of dW over T = 8192), 256 in fp32 (dW
# accumulates in fp32 there: the chunk only sets the buffer, 156 MB again).
GPU_CONFIG_16BIT = KernelConfig(chunk_tokens=512, block_v=4096, block_d=1024, num_warps=8)
GPU_CONFIG_32BIT = KernelConfig(chunk_tokens=256, block_v=4096, block_d=1024, num_warps=8)
# The interpreter pays per tl op: the odd test shapes (T 47, D 123, V 507) span several
# chunks, vocabulary steps and hidden steps.
INTERPRETER_CONFIG = KernelConfig(chunk_tokens=16, block_v=128, block_d=64, num_warps=4)

SCALE_BLOCK = 4096


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_config(dtype: torch.dtype) -> KernelConfig:
    if interpreting():
        return INTERPRETER_CONFIG
    return GPU_CONFIG_32BIT if dtype == torch.float32 else GPU_CONFIG_16BIT


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _weighted_nll_fwd_kernel(z_ptr, stride_z, tgt_ptr, w_ptr, h_ptr, stride_h, wt_ptr, stride_wv, stride_wd,
                             b_ptr, logp_ptr, V, D, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                             EXACT_TARGET: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row t of the logits chunk Z (raw h·Wᵀ + b): logp[t], then Z[t] <- G[t] in place.

    G = w·(exp(z - lse) - onehot)·(1 - (z/softcap)²), z the capped logits. Rows of weight 0
    (ignored tokens: their hidden row is 0 and their target 0) get G = 0 exactly.
    """
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    tgt = tl.load(tgt_ptr + row)
    w = tl.load(w_ptr + row)
    if EXACT_TARGET:
        # The target logit in fp32 from the 16-bit operands (exact products, fp32 sums).
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            h = tl.load(h_ptr + row.to(tl.int64) * stride_h + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            wt = tl.load(wt_ptr + tgt * stride_wv + offs_d * stride_wd, mask=mask_d, other=0.0).to(tl.float32)
            acc += h * wt
        z_t = tl.sum(acc, axis=0)
        if HAS_BIAS:
            z_t += tl.load(b_ptr + tgt).to(tl.float32)
    else:
        z_t = tl.load(z_row + tgt).to(tl.float32)
    z_t = _capped(z_t, softcap, HAS_SOFTCAP)

    # Pass 1: online log-sum-exp, (max m, sum s) with s compensated by c.
    m = tl.full((), float("-inf"), dtype=tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    c = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = _capped(tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(offs == tgt, z_t, z)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        s, c = _two_sum(s * scale, tl.sum(tl.exp(z - m_new), axis=0), c * scale)
        m = m_new
    log_sum = tl.log(s + c)
    lse = m + log_sum
    # z_t - m is exact; z_t - lse would keep lse's rounding (~2e-6 at lse ~ 30).
    tl.store(logp_ptr + row, (z_t - m) - log_sum)

    # Pass 2: G over the row, in place (each element is read before it is written, by the
    # same program: no other program touches this row).
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = _capped(tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        is_target = offs == tgt
        z = tl.where(is_target, z_t, z)
        g = w * (tl.exp(z - lse) - tl.where(is_target, 1.0, 0.0))
        if HAS_SOFTCAP:
            th = z / softcap
            g = g * (1.0 - th * th)
        tl.store(z_row + offs, g.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_nll_scale_kernel(x_ptr, n, g_ptr, BLOCK: tl.constexpr):
    """x *= g in place (fp32 product, one rounding); every program returns at once if g == 1."""
    g = tl.load(g_ptr).to(tl.float32)
    if g == 1.0:
        return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


def weighted_nll_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     valid: torch.Tensor, token_weights: torch.Tensor, softcap: float, need_hidden: bool,
                     need_weight: bool, need_bias: bool, config: KernelConfig | None = None):
    """(logp [N] f32, dH [N, D] | None, dW [V, D] | None, dB [V] | None) of L = -Σ w·logp.

    hidden [N, D], weight [V, D] (any strides), targets [N] (in [0, V) where ``valid``),
    token_weights [N] f32, already 0 where not ``valid``. Gradients in the inputs' dtypes.
    logp is garbage where not valid (the caller masks it).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    cfg = config or default_config(dtype)
    need_bias = need_bias and bias is not None
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else None
    d_bias = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need_bias else None
    if n == 0:
        if d_weight is not None:
            d_weight.zero_()
        return logp, d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)
    w_mat = weight.to(dtype)  # [V, D]; a no-op unless the dtypes are mixed (or bf16 in the interpreter)
    b_vec = None if bias is None else bias.to(dtype).contiguous()  # [V]
    targets = torch.where(valid, targets, 0).contiguous()  # [N]; ignored rows: any in-range index
    token_weights = token_weights.to(torch.float32).contiguous()  # [N]
    chunk = min(cfg.chunk_tokens, n)
    buf = torch.empty((chunk, v), dtype=dtype, device=hidden.device)  # logits, then G, of one chunk
    # dW in the weight dtype; a compute-dtype accumulator only for mixed dtypes.
    dw_acc = d_weight if d_weight is None or d_weight.dtype == dtype else torch.empty(weight.shape, dtype=dtype,
                                                                                          device=weight.device)
    for index, start in enumerate(range(0, n, chunk)):
        rows = slice(start, min(n, start + chunk))
        count = rows.stop - start
        # [count, D], a fresh contiguous copy: ignored rows zeroed (0 * inf would be NaN in dW).
        h_c = torch.where(valid[rows, None], hidden[rows], 0).to(dtype).contiguous()
        z = buf[:count]  # [count, V]
        if b_vec is None:
            torch.mm(h_c, w_mat.T, out=z)
        else:
            torch.addmm(b_vec, h_c, w_mat.T, out=z)
        _weighted_nll_fwd_kernel[(count,)](
            z, z.stride(0), targets[rows], token_weights[rows], h_c, h_c.stride(0), w_mat, *w_mat.stride(),
            b_vec if b_vec is not None else w_mat, logp[rows], v, d, float(softcap), HAS_BIAS=b_vec is not None,
            HAS_SOFTCAP=softcap > 0, EXACT_TARGET=dtype != torch.float32, BLOCK_V=cfg.block_v,
            BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
        if need_hidden:  # one rounding to the hidden dtype, from fp32 accumulation
            if d_hidden.dtype == dtype:
                torch.mm(z, w_mat, out=d_hidden[rows])
            else:
                d_hidden[rows] = torch.mm(z, w_mat)
        if need_weight:  # fp32 accumulation inside each product, one rounding per chunk
            if index == 0:
                torch.mm(z.T, h_c, out=dw_acc)
            else:
                dw_acc.addmm_(z.T, h_c)
        if need_bias:
            d_bias += z.sum(0, dtype=torch.float32)
    if dw_acc is not d_weight and d_weight is not None:
        d_weight.copy_(dw_acc)
    return logp, d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)


def scale_(grad: torch.Tensor, tensor: torch.Tensor) -> None:
    """tensor *= grad (a 0-dim tensor) in place; nothing is read or written when grad == 1."""
    if tensor.numel() == 0:
        return
    assert tensor.is_contiguous()
    n = tensor.numel()
    _weighted_nll_scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](tensor, n, grad.reshape(1), BLOCK=SCALE_BLOCK)
