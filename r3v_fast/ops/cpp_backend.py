"""The "cpp" backend (fused token log-likelihood, weighted NLL, paged decode attention): torch tensors in,
r3v_fast._C out.

r3v_fast._C (csrc/, built by CMake + pybind11, no torch headers) works on raw float/int64
buffers. This module checks the tensors, hands them over zero-copy as numpy views, allocates
the outputs as torch tensors and lets the C++ code write into them. The ops in r3v_fast/ops/
(token_logprob, segment_logprob, weighted_nll, paged_cascade_decode_attention) dispatch here on
the CPU when ``available()``.

Numerics (csrc/token_logprob.cpp): fp32 accumulation of every dot product, of the
logsumexp and of dW/db; the target logit is taken from the fp32 tile before any rounding.
The logsumexp sums each vocabulary block separately and adds the block totals with a
compensated (TwoSum) running sum, so the tail of a peaked softmax is kept.
The [N, V] logits are never stored; backward recomputes them tile by tile. Results are
bitwise reproducible for a fixed ``torch.get_num_threads()``; logp, lse, d weight and d bias
even for any thread count (only d hidden sums per-thread partials).

weighted_nll (csrc/weighted_nll.cpp) forms its gradients in the forward, chunk by chunk (one
[V, chunk] fp32 logits buffer, three GEMMs), with the same numerics; all of its results are
bitwise identical for any thread count.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

try:
    from r3v_fast import _C
except ImportError:  # built without the extension (R3V_NO_CPP=1, no compiler): pure Python
    _C = None


def available() -> bool:
    """True iff the C++ extension r3v_fast._C was built and imports."""
    return _C is not None


def _require() -> None:
    if _C is None:
        raise RuntimeError("r3v_fast._C is not built: reinstall with a C++ compiler and CMake "
                           "(`pip install -e .`, without R3V_NO_CPP=1) or use backend='torch'")


_CTYPES = {torch.float32: ctypes.c_float, torch.int64: ctypes.c_int64, torch.int32: ctypes.c_int32}
_NUMPY = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}


def _as_buffer(tensor: torch.Tensor, name: str, dtype: torch.dtype):
    """A contiguous CPU tensor of ``dtype`` as a numpy view (no copy when already contiguous).

    The view is made from the data pointer, not with ``Tensor.numpy()``: that would mark the
    tensor's storage as not resizable for good, and FSDP2 frees and regrows the storage of
    unsharded parameters (the LM-head weight) around every forward. The view keeps the tensor
    alive for as long as it exists."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name}: the cpp backend runs on the CPU, got a tensor on {tensor.device}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name}: the cpp backend takes {dtype}, got {tensor.dtype}")
    tensor = tensor.detach().contiguous()
    if tensor.numel() == 0:
        return np.empty(tuple(tensor.shape), dtype=_NUMPY[dtype])
    memory = (_CTYPES[dtype] * tensor.numel()).from_address(tensor.data_ptr())
    memory.owner = tensor   # the numpy view holds `memory`, which holds the tensor
    # numpy's own dtype object (the ctypes-derived one is equal but not the same to pybind11)
    return np.ctypeslib.as_array(memory).view(_NUMPY[dtype]).reshape(tuple(tensor.shape))


def _inputs(hidden, weight, bias, targets):
    return (_as_buffer(hidden, "hidden", torch.float32), _as_buffer(weight, "weight", torch.float32),
            None if bias is None else _as_buffer(bias, "bias", torch.float32),
            _as_buffer(targets, "targets", torch.int64))


def token_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logp[N] = z[target] - lse and lse[N] = logsumexp_v z, for z = hidden @ weight.T + bias
    (soft-capped as softcap * tanh(z / softcap) when softcap > 0). hidden [N, D] f32,
    weight [V, D] f32, bias [V] f32 or None, targets [N] int64 with 0 <= t < V."""
    _require()
    h, w, b, t = _inputs(hidden, weight, bias, targets)
    logp = torch.empty(h.shape[0], dtype=torch.float32)  # [N]
    lse = torch.empty(h.shape[0], dtype=torch.float32)   # [N]
    _C.token_logprob_fwd(h, w, b, t, float(softcap), logp.numpy(), lse.numpy(), torch.get_num_threads())
    return logp, lse


def token_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, softcap: float,
                      need_hidden: bool, need_weight: bool, need_bias: bool
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_n grad_logp[n] * logp[n]: (d hidden [N, D], d weight [V, D], d bias [V]),
    each None unless requested (d bias also None without a bias). lse is the forward's."""
    _require()
    h, w, b, t = _inputs(hidden, weight, bias, targets)
    n, d = h.shape
    v = w.shape[0]
    grad_hidden = torch.empty(n, d, dtype=torch.float32) if need_hidden else None          # [N, D]
    grad_weight = torch.empty(v, d, dtype=torch.float32) if need_weight else None          # [V, D]
    grad_bias = torch.empty(v, dtype=torch.float32) if need_bias and b is not None else None  # [V]
    _C.token_logprob_bwd(h, w, b, t, _as_buffer(lse, "lse", torch.float32),
                         _as_buffer(grad_logp, "grad_logp", torch.float32), float(softcap),
                         None if grad_hidden is None else grad_hidden.numpy(),
                         None if grad_weight is None else grad_weight.numpy(),
                         None if grad_bias is None else grad_bias.numpy(), torch.get_num_threads())
    return grad_hidden, grad_weight, grad_bias


def weighted_nll_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     token_weights: torch.Tensor, softcap: float, need_hidden: bool, need_weight: bool,
                     need_bias: bool, *, chunk_tokens: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(logp [N], d hidden [N, D], d weight [V, D], d bias [V]) of L = -sum_n token_weights[n] * logp[n],
    gradients formed in the forward (csrc/weighted_nll.cpp); each gradient None unless requested
    (d bias also None without a bias). token_weights [N] f32; chunk_tokens 0: automatic."""
    _require()
    h, w, b, t = _inputs(hidden, weight, bias, targets)
    n, d = h.shape
    v = w.shape[0]
    logp = torch.empty(n, dtype=torch.float32)                                              # [N]
    grad_hidden = torch.empty(n, d, dtype=torch.float32) if need_hidden else None           # [N, D]
    grad_weight = torch.empty(v, d, dtype=torch.float32) if need_weight else None           # [V, D]
    grad_bias = torch.empty(v, dtype=torch.float32) if need_bias and b is not None else None  # [V]
    _C.weighted_nll_fwd(h, w, b, t, _as_buffer(token_weights, "token_weights", torch.float32), float(softcap),
                        logp.numpy(), None if grad_hidden is None else grad_hidden.numpy(),
                        None if grad_weight is None else grad_weight.numpy(),
                        None if grad_bias is None else grad_bias.numpy(), int(chunk_tokens), torch.get_num_threads())
    return logp, grad_hidden, grad_weight, grad_bias


def weighted_nll_workspace_bytes(n: int, d: int, v: int, *, need_hidden: bool = True, need_weight: bool = True,
                                 chunk_tokens: int = 0) -> int:
    """Scratch bytes one weighted_nll_fwd call allocates besides its outputs (for memory reports)."""
    _require()
    return _C.weighted_nll_workspace_bytes(n, d, v, chunk_tokens, torch.get_num_threads(), need_hidden, need_weight)


def workspace_bytes(n: int, d: int, v: int, *, backward: bool, need_hidden: bool = True,
                    need_weight: bool = True, need_bias: bool = False) -> int:
    """Scratch bytes one fwd/bwd call allocates besides its outputs (for memory reports)."""
    _require()
    return _C.token_logprob_workspace_bytes(n, d, v, torch.get_num_threads(), backward,
                                            need_hidden, need_weight, need_bias)


def paged_cascade_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                   question_slots: torch.Tensor, prefix_tables: torch.Tensor,
                                   prefix_lens: torch.Tensor, slot_tables: torch.Tensor, slot_lens: torch.Tensor,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged cascade decode attention (csrc/paged_attention.cpp): float32 q [S, H, Dh] and
    pools [NB, Hkv, BS, Dh]; tables and lengths of any integer dtype (copied to contiguous
    int32, they are small). -> (o [S, H, Dh], lse [S, H]) float32; fp32 accumulation,
    independent of the thread count."""
    _require()

    def index(t, name):
        return _as_buffer(t.to(torch.int32), name, torch.int32)

    out = torch.empty(q.shape, dtype=torch.float32)                 # [S, H, Dh]
    lse = torch.empty(q.shape[:2], dtype=torch.float32)             # [S, H]
    _C.paged_cascade_decode_attention(
        _as_buffer(q, "q", torch.float32), _as_buffer(k_pool, "k_pool", torch.float32),
        _as_buffer(v_pool, "v_pool", torch.float32), index(question_slots, "question_slots"),
        index(prefix_tables, "prefix_tables"), index(prefix_lens, "prefix_lens"),
        index(slot_tables, "slot_tables"), index(slot_lens, "slot_lens"), float(scale), out.numpy(), lse.numpy(),
        torch.get_num_threads())
    return out, lse
