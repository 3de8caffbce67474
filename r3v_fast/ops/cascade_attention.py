"""Cascade decode attention for shared-prefix sampling: public functions and backend dispatch.

One decode step of K branches per question, where every branch reads one shared copy of its
question's prefix KV plus its own suffix KV (see r3v_fast.reference.cascade_attention for the
algebra). Shapes, for Q questions x K branches, H query heads, Hkv KV heads (H % Hkv == 0):

    q                   [Q, K, H, Dh]          one new query token per branch
    prefix_k, prefix_v  [N, Hkv, P_max, Dh]    prefix pool (N = Q unless prefix_index is given)
    prefix_lens         [Q]   int              valid prefix length read by question q
    prefix_index        [Q]   int, optional    slot of prefix_k/v that question q reads
    suffix_k, suffix_v  [Q, K, Hkv, S_max, Dh] each branch's generated-token KV
    suffix_lens         [Q, K] int             0 = empty suffix
    -> o [Q, K, H, Dh] in q's dtype (+ lse [Q, K, H] float32, natural log, if return_lse)

Head h of a branch reads KV head h // (H / Hkv) (the repeat_interleave convention of HF GQA).
Lengths are clamped to the buffer size; positions past a length are padding and never read.
Any strides are accepted, so cache views (e.g. one slice of a preallocated [.., S_cap, Dh]
buffer) go in without copies. The functions are inference-only (no autograd) and do no host
synchronisation, so lengths are not range-checked against the data.

Backends (docs/architecture.md): "triton" (CUDA; or CPU tensors under TRITON_INTERPRET=1),
"torch" (the reference), chosen by the shared rule of r3v_fast/ops/backend.py. The dense op has
no C++ kernel, so R3V_BACKEND=cpp means its torch path; the paged op has one (float32, the CPU
path of the continuous sampler, csrc/paged_attention.cpp).

``cascade_decode_attention`` is registered as the custom op ``r3v::cascade_decode_attention``
(with a fake kernel for torch.compile and meta tensors; checked with torch.library.opcheck),
like the fused loss. The partial-state helpers below it are plain functions over the same
backends, used by tests and benchmarks.

``paged_cascade_decode_attention`` (op ``r3v::paged_cascade_decode_attention``) is the same
attention over a block pool, for the continuous-batching sampler: one query per decode slot,
prefix and branch tokens found through block tables (layout in
r3v_fast.reference.cascade_attention):

    q                   [S, H, Dh]            one query per decode slot
    k_pool, v_pool      [NB, Hkv, BS, Dh]     NB blocks of BS tokens
    question_slots      [R, W] int            the slots of question row r (-1 = none)
    prefix_tables       [R, MPB] int          blocks of row r's prefix, in order
    prefix_lens         [R] int
    slot_tables         [S, MSB] int          blocks of each slot's own tokens, in order
    slot_lens           [S] int
    -> o [S, H, Dh] (0 for slots no row lists) (+ lse [S, H] float32, -inf there)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from r3v_fast.ops.backend import resolve_backend
from r3v_fast.reference import cascade_attention as _reference

def _resolve_backend(backend: str, device: torch.device) -> str:
    return resolve_backend("cascade attention", backend, device, has_cpp=False)


def _resolve_paged_backend(backend: str, q: Tensor) -> str:
    """The paged op has a C++ kernel (float32 only): "auto" takes it for float32 CPU inputs when
    built and the torch path for other dtypes; an explicit "cpp" with another dtype raises."""
    chosen = resolve_backend("paged cascade attention", backend, q.device, has_cpp=True)
    if chosen == "cpp" and q.dtype != torch.float32:
        if backend != "auto":
            raise ValueError(f"paged cascade attention: the cpp backend takes float32, got {q.dtype}")
        return "torch"
    return chosen


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"cascade attention: {message}")


def _validate(q: Tensor, prefix=None, suffix=None, prefix_index=None) -> None:
    """Shape/dtype/device checks with messages that name the offending argument."""
    _check(q.dim() == 4, f"q must be [Q, K, H, Dh], got shape {tuple(q.shape)}")
    _check(q.is_floating_point(), f"q must be floating point, got {q.dtype}")
    num_q, num_branches, num_heads, head_dim = q.shape
    if prefix is not None:
        prefix_k, prefix_v, prefix_lens = prefix
        _check(prefix_k.dim() == 4, f"prefix_k must be [N, Hkv, P_max, Dh], got {tuple(prefix_k.shape)}")
        _check(prefix_v.shape == prefix_k.shape,
               f"prefix_v shape {tuple(prefix_v.shape)} != prefix_k shape {tuple(prefix_k.shape)}")
        _check(prefix_k.shape[3] == head_dim, f"prefix_k head dim {prefix_k.shape[3]} != q head dim {head_dim}")
        _check(num_heads % prefix_k.shape[1] == 0,
               f"query heads {num_heads} not a multiple of prefix KV heads {prefix_k.shape[1]}")
        _check(tuple(prefix_lens.shape) == (num_q,),
               f"prefix_lens must be [Q={num_q}], got {tuple(prefix_lens.shape)}")
        _check(not prefix_lens.is_floating_point(), f"prefix_lens must be integer, got {prefix_lens.dtype}")
        if prefix_index is None:
            _check(prefix_k.shape[0] == num_q,
                   f"prefix_k has {prefix_k.shape[0]} prefixes for {num_q} questions; pass prefix_index")
        else:
            _check(tuple(prefix_index.shape) == (num_q,),
                   f"prefix_index must be [Q={num_q}], got {tuple(prefix_index.shape)}")
            _check(not prefix_index.is_floating_point(), f"prefix_index must be integer, got {prefix_index.dtype}")
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            _check(t.dtype == q.dtype, f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    if suffix is not None:
        suffix_k, suffix_v, suffix_lens = suffix
        _check(suffix_k.dim() == 5, f"suffix_k must be [Q, K, Hkv, S_max, Dh], got {tuple(suffix_k.shape)}")
        _check(suffix_v.shape == suffix_k.shape,
               f"suffix_v shape {tuple(suffix_v.shape)} != suffix_k shape {tuple(suffix_k.shape)}")
        _check(tuple(suffix_k.shape[:2]) == (num_q, num_branches) and suffix_k.shape[4] == head_dim,
               f"suffix_k shape {tuple(suffix_k.shape)} does not match q [Q={num_q}, K={num_branches}, "
               f"H, Dh={head_dim}]")
        _check(num_heads % suffix_k.shape[2] == 0,
               f"query heads {num_heads} not a multiple of suffix KV heads {suffix_k.shape[2]}")
        _check(tuple(suffix_lens.shape) == (num_q, num_branches),
               f"suffix_lens must be [Q={num_q}, K={num_branches}], got {tuple(suffix_lens.shape)}")
        _check(not suffix_lens.is_floating_point(), f"suffix_lens must be integer, got {suffix_lens.dtype}")
        for name, t in (("suffix_k", suffix_k), ("suffix_v", suffix_v)):
            _check(t.dtype == q.dtype, f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    if prefix is not None and suffix is not None:
        _check(prefix[0].shape[1] == suffix[0].shape[2],
               f"prefix KV heads {prefix[0].shape[1]} != suffix KV heads {suffix[0].shape[2]}")
    tensors = [q, *(prefix or ()), *(suffix or ())] + ([prefix_index] if prefix_index is not None else [])
    for t in tensors:
        _check(t.device == q.device, f"all inputs must be on {q.device}; found one on {t.device}")


@torch.library.custom_op("r3v::cascade_decode_attention", mutates_args=())
def _cascade_decode_op(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_lens: Tensor,
                       suffix_k: Tensor, suffix_v: Tensor, suffix_lens: Tensor,
                       prefix_index: Optional[Tensor], scale: float, num_splits: int,
                       backend: str) -> tuple[Tensor, Tensor]:
    """(o [Q, K, H, Dh] in q's dtype, lse [Q, K, H] f32); num_splits 0 = automatic."""
    if backend == "torch":
        o, lse = _reference.cascade_decode_attention(
            q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
            scale=scale, prefix_index=prefix_index, return_lse=True)
        return o, lse.float()
    from r3v_fast.kernels.cascade_attention import cascade_decode_fwd
    return cascade_decode_fwd(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                              scale=scale, prefix_index=prefix_index, num_splits=num_splits or None,
                              return_lse=True)


@_cascade_decode_op.register_fake
def _(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, prefix_index, scale,
      num_splits, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def cascade_decode_attention(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_lens: Tensor,
                             suffix_k: Tensor, suffix_v: Tensor, suffix_lens: Tensor, *,
                             scale: float | None = None, prefix_index: Tensor | None = None,
                             return_lse: bool = False, num_splits: int | None = None,
                             backend: str = "auto"):
    """Attention of each branch's new query over [its question's prefix ; its own suffix].

    scale defaults to 1/sqrt(Dh). num_splits (triton only) splits the key length over that
    many programs plus a merge pass; None picks it from the shapes (more splits when
    Q * Hkv programs underfill the GPU); the torch backend ignores it. Returns o, or
    (o, lse) if return_lse. Runs the registered op ``r3v::cascade_decode_attention``.
    """
    _validate(q, (prefix_k, prefix_v, prefix_lens), (suffix_k, suffix_v, suffix_lens), prefix_index)
    _check(num_splits is None or num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, lse = torch.ops.r3v.cascade_decode_attention(
        q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, prefix_index, scale,
        num_splits or 0, _resolve_backend(backend, q.device))
    return (o, lse) if return_lse else o


def _validate_paged(q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens):
    _check(q.dim() == 3, f"q must be [S, H, Dh], got shape {tuple(q.shape)}")
    _check(q.is_floating_point(), f"q must be floating point, got {q.dtype}")
    num_slots, num_heads, head_dim = q.shape
    _check(k_pool.dim() == 4, f"k_pool must be [NB, Hkv, BS, Dh], got {tuple(k_pool.shape)}")
    _check(v_pool.shape == k_pool.shape,
           f"v_pool shape {tuple(v_pool.shape)} != k_pool shape {tuple(k_pool.shape)}")
    _check(k_pool.shape[3] == head_dim, f"k_pool head dim {k_pool.shape[3]} != q head dim {head_dim}")
    _check(num_heads % k_pool.shape[1] == 0,
           f"query heads {num_heads} not a multiple of pool KV heads {k_pool.shape[1]}")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        _check(t.dtype == q.dtype, f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    _check(question_slots.dim() == 2, f"question_slots must be [R, W], got {tuple(question_slots.shape)}")
    num_rows = question_slots.shape[0]
    _check(prefix_tables.dim() == 2 and prefix_tables.shape[0] == num_rows,
           f"prefix_tables must be [R={num_rows}, MPB], got {tuple(prefix_tables.shape)}")
    _check(tuple(prefix_lens.shape) == (num_rows,),
           f"prefix_lens must be [R={num_rows}], got {tuple(prefix_lens.shape)}")
    _check(slot_tables.dim() == 2 and slot_tables.shape[0] == num_slots,
           f"slot_tables must be [S={num_slots}, MSB], got {tuple(slot_tables.shape)}")
    _check(tuple(slot_lens.shape) == (num_slots,), f"slot_lens must be [S={num_slots}], got {tuple(slot_lens.shape)}")
    for name, t in (("question_slots", question_slots), ("prefix_tables", prefix_tables),
                    ("prefix_lens", prefix_lens), ("slot_tables", slot_tables), ("slot_lens", slot_lens)):
        _check(not t.is_floating_point(), f"{name} must be integer, got {t.dtype}")
    for t in (k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens):
        _check(t.device == q.device, f"all inputs must be on {q.device}; found one on {t.device}")


@torch.library.custom_op("r3v::paged_cascade_decode_attention", mutates_args=())
def _paged_cascade_decode_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, question_slots: Tensor,
                             prefix_tables: Tensor, prefix_lens: Tensor, slot_tables: Tensor,
                             slot_lens: Tensor, scale: float, num_splits: int,
                             backend: str) -> tuple[Tensor, Tensor]:
    """(o [S, H, Dh] in q's dtype, lse [S, H] f32); num_splits 0 = automatic."""
    if backend == "torch":
        return _reference.paged_cascade_decode_attention(
            q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens,
            scale=scale, return_lse=True)
    if backend == "cpp":
        from r3v_fast.ops import cpp_backend
        return cpp_backend.paged_cascade_decode_attention(q, k_pool, v_pool, question_slots, prefix_tables,
                                                          prefix_lens, slot_tables, slot_lens, scale)
    from r3v_fast.kernels.cascade_attention import paged_cascade_decode_fwd
    return paged_cascade_decode_fwd(q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens,
                                    slot_tables, slot_lens, scale=scale, num_splits=num_splits or None,
                                    return_lse=True)


@_paged_cascade_decode_op.register_fake
def _(q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens, scale,
      num_splits, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


def paged_cascade_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, question_slots: Tensor,
                                   prefix_tables: Tensor, prefix_lens: Tensor, slot_tables: Tensor,
                                   slot_lens: Tensor, *, scale: float | None = None,
                                   return_lse: bool = False, num_splits: int | None = None,
                                   backend: str = "auto"):
    """Attention of each decode slot's query over [its question's prefix ; its own tokens], with
    keys and values in a block pool (shapes in the module docstring). scale defaults to
    1/sqrt(Dh); num_splits as ``cascade_decode_attention``. Returns o, or (o, lse) if
    return_lse. Runs the registered op ``r3v::paged_cascade_decode_attention``; no host sync."""
    _validate_paged(q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens)
    _check(num_splits is None or num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, lse = torch.ops.r3v.paged_cascade_decode_attention(
        q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens, scale,
        num_splits or 0, _resolve_paged_backend(backend, q))
    return (o, lse) if return_lse else o


def prefix_attention(q: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_lens: Tensor, *,
                     scale: float | None = None, prefix_index: Tensor | None = None,
                     num_splits: int | None = None, backend: str = "auto"):
    """Partial state over the shared prefix only: (o [Q, K, H, Dh] float32, lse [Q, K, H] float32)."""
    _validate(q, prefix=(prefix_k, prefix_v, prefix_lens), prefix_index=prefix_index)
    _check(num_splits is None or num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    if _resolve_backend(backend, q.device) == "torch":
        o, lse = _reference.prefix_attention(q, prefix_k, prefix_v, prefix_lens, scale=scale,
                                             prefix_index=prefix_index)
        return o.float(), lse.float()
    from r3v_fast.kernels.cascade_attention import cascade_decode_fwd
    return cascade_decode_fwd(q, prefix_k, prefix_v, prefix_lens, scale=scale,
                              prefix_index=prefix_index, num_splits=num_splits,
                              return_lse=True, out_dtype=torch.float32)


def suffix_attention(q: Tensor, suffix_k: Tensor, suffix_v: Tensor, suffix_lens: Tensor, *,
                     scale: float | None = None, num_splits: int | None = None,
                     backend: str = "auto"):
    """Partial state over each branch's own suffix: (o float32, lse float32); empty -> (0, -inf)."""
    _validate(q, suffix=(suffix_k, suffix_v, suffix_lens))
    _check(num_splits is None or num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    if _resolve_backend(backend, q.device) == "torch":
        o, lse = _reference.suffix_attention(q, suffix_k, suffix_v, suffix_lens, scale=scale)
        return o.float(), lse.float()
    from r3v_fast.kernels.cascade_attention import cascade_decode_fwd
    return cascade_decode_fwd(q, suffix_k=suffix_k, suffix_v=suffix_v, suffix_lens=suffix_lens,
                              scale=scale, num_splits=num_splits, return_lse=True,
                              out_dtype=torch.float32)


def merge_attention_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor, *,
                           backend: str = "auto"):
    """Merge two partial states over disjoint key sets: o_* [..., Dh], lse_* [...] (natural log).

    A side with lse = -inf contributes nothing (both empty -> o = 0, lse = -inf). Returns o in
    o_a's dtype and lse float32.
    """
    _check(o_a.shape == o_b.shape, f"o_a shape {tuple(o_a.shape)} != o_b shape {tuple(o_b.shape)}")
    _check(lse_a.shape == lse_b.shape == o_a.shape[:-1],
           f"lse shapes {tuple(lse_a.shape)}, {tuple(lse_b.shape)} must equal o shape without its "
           f"last dim {tuple(o_a.shape[:-1])}")
    _check(len({t.device for t in (o_a, lse_a, o_b, lse_b)}) == 1, "all inputs must be on one device")
    if _resolve_backend(backend, o_a.device) == "torch":
        o, lse = _reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
        return o, lse.float()
    from r3v_fast.kernels.cascade_attention import merge_attention_states_fwd
    head_dim = o_a.shape[-1]
    o_parts = torch.stack([o_a.reshape(-1, head_dim), o_b.reshape(-1, head_dim)])   # [2, R, Dh]
    lse_parts = torch.stack([lse_a.reshape(-1), lse_b.reshape(-1)])               # [2, R]
    out = torch.empty(o_a.shape, device=o_a.device, dtype=o_a.dtype)
    lse = torch.empty(lse_a.shape, device=o_a.device, dtype=torch.float32)
    merge_attention_states_fwd(o_parts, lse_parts, out=out.view(-1, head_dim), lse_out=lse.view(-1))
    return out, lse
