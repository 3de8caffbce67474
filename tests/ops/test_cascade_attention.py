"""Tests for cascade decode attention (r3v_fast.ops.cascade_attention and its backends).

Oracle: `_exact_attention`, a few-line float64 loop that, for every (question, branch, head),
concatenates the valid prefix and suffix keys and runs plain softmax attention. It shares no
code with the package. Errors are judged as in docs/architecture.md ("Numerics and tests"):
max |out - exact| must be at most 2x the error of naive attention computed in the same dtype
(`_eager_attention`) plus a floor (fp32 1e-5, fp16 1e-3, bf16 1e-2).

The Triton backend runs on CUDA, or on the CPU when TRITON_INTERPRET=1 is set before the run:
    TRITON_INTERPRET=1 python -m pytest tests/ops/test_cascade_attention.py -q
Interpreter shapes are kept small so the file runs in about a minute on two cores.
"""

import math
import os

import pytest
import torch

from r3v_fast.ops import cascade_attention as ops
from r3v_fast.reference import cascade_attention as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNNABLE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
except ImportError:
    TRITON_RUNNABLE = False
needs_triton = pytest.mark.skipif(not TRITON_RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _exact_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                     scale, prefix_index=None):
    """float64 attention over [prefix[:prefix_len]; suffix[:suffix_len]], one row at a time."""
    num_q, num_branches, num_heads, head_dim = q.shape
    group = num_heads // prefix_k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float64)
    for i in range(num_q):
        slot = i if prefix_index is None else int(prefix_index[i])
        for b in range(num_branches):
            for h in range(num_heads):
                p_len, s_len = int(prefix_lens[i]), int(suffix_lens[i, b])
                keys = torch.cat([prefix_k[slot, h // group, :p_len], suffix_k[i, b, h // group, :s_len]])
                values = torch.cat([prefix_v[slot, h // group, :p_len], suffix_v[i, b, h // group, :s_len]])
                if len(keys) == 0:
                    continue
                scores = keys.double().cpu() @ q[i, b, h].double().cpu() * scale
                lse[i, b, h] = torch.logsumexp(scores, 0)
                out[i, b, h] = torch.softmax(scores, 0) @ values.double().cpu()
    return out, lse


def _eager_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, scale):
    """Naive attention entirely in the inputs' dtype: the "eager error" yardstick of the
    tolerance rule (docs/architecture.md, "Numerics and tests")."""
    num_q, num_branches, num_heads, _ = q.shape
    group = num_heads // prefix_k.shape[1]
    out = torch.zeros_like(q)
    for i in range(num_q):
        for b in range(num_branches):
            p_len, s_len = int(prefix_lens[i]), int(suffix_lens[i, b])
            keys = torch.cat([prefix_k[i, :, :p_len], suffix_k[i, b, :, :s_len]], 1)   # [Hkv, T, Dh]
            values = torch.cat([prefix_v[i, :, :p_len], suffix_v[i, b, :, :s_len]], 1)
            keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
            scores = (keys @ q[i, b].unsqueeze(-1)).squeeze(-1) * scale                # [H, T]
            out[i, b] = (torch.softmax(scores, -1).unsqueeze(1) @ values).squeeze(1)
    return out


def _make_case(prefix_lens, suffix_lens, num_heads=4, num_kv_heads=2, head_dim=16,
               dtype=torch.float32, seed=0, prefix_max=None, suffix_max=None):
    """Random inputs; padding positions hold large garbage so that reading them would show."""
    gen = torch.Generator().manual_seed(seed)
    prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32)
    suffix_lens = torch.tensor(suffix_lens, dtype=torch.int32)
    num_q, num_branches = suffix_lens.shape
    prefix_max = prefix_max or int(prefix_lens.max())
    suffix_max = suffix_max or max(int(suffix_lens.max()), 1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q = rand(num_q, num_branches, num_heads, head_dim)
    prefix_k, prefix_v = (rand(num_q, num_kv_heads, prefix_max, head_dim) for _ in range(2))
    suffix_k, suffix_v = (rand(num_q, num_branches, num_kv_heads, suffix_max, head_dim) for _ in range(2))
    for i in range(num_q):
        prefix_k[i, :, int(prefix_lens[i]):] = 1e4
        prefix_v[i, :, int(prefix_lens[i]):] = float("nan")
        for b in range(num_branches):
            suffix_k[i, b, :, int(suffix_lens[i, b]):] = 1e4
            suffix_v[i, b, :, int(suffix_lens[i, b]):] = float("nan")
    tensors = [t.to(DEVICE, dtype) for t in (q, prefix_k, prefix_v)]
    tensors += [prefix_lens.to(DEVICE)]
    tensors += [t.to(DEVICE, dtype) for t in (suffix_k, suffix_v)] + [suffix_lens.to(DEVICE)]
    return tensors


def _assert_accurate(out, args, dtype, scale, what):
    exact, _ = _exact_attention(*args, scale)
    eager = _eager_attention(*(t.cpu() for t in args), scale)
    err = (out.double().cpu() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    bound = 2 * eager_err + FLOOR[dtype]
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (eager {eager_err:.3g})"


# (name, prefix_lens [Q], suffix_lens [Q][K], H, Hkv, Dh)
CASES = [
    ("empty_suffix", [5, 9], [[0, 0, 0], [0, 0, 0]], 4, 2, 16),
    ("prefix_len_1", [1, 1], [[3, 0], [1, 7]], 4, 2, 16),
    ("long_prefix", [300, 257], [[4, 33], [1, 0]], 4, 2, 32),
    ("head_dim_40", [23, 8], [[2, 5, 0], [9, 1, 4]], 4, 2, 40),
    ("head_dim_72", [17, 40], [[6, 0], [3, 12]], 4, 4, 72),
    ("mha_h_eq_hkv", [11, 30, 7], [[2], [0], [35]], 4, 4, 16),
    ("ragged_k8", [45, 3], [[0, 1, 2, 3, 5, 8, 13, 21], [34, 0, 9, 1, 1, 2, 0, 6]], 4, 2, 24),
    ("k1", [12, 64, 33], [[0], [5], [40]], 4, 2, 16),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_backend_matches_float64_full_attention(case):
    _, prefix_lens, suffix_lens, num_heads, num_kv_heads, head_dim = case
    args = _make_case(prefix_lens, suffix_lens, num_heads, num_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    out = ops.cascade_decode_attention(*args, backend="torch")
    _assert_accurate(out, args, torch.float32, scale, "torch cascade")
    naive = reference.naive_decode_attention(*args)
    _assert_accurate(naive, args, torch.float32, scale, "torch naive")


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_fp32_matches_float64_full_attention(case):
    _, prefix_lens, suffix_lens, num_heads, num_kv_heads, head_dim = case
    args = _make_case(prefix_lens, suffix_lens, num_heads, num_kv_heads, head_dim)
    scale = 0.3  # a non-default scale: checks that it reaches the kernel
    out, lse = ops.cascade_decode_attention(*args, scale=scale, return_lse=True, backend="triton")
    assert out.dtype == torch.float32 and out.shape == args[0].shape
    _assert_accurate(out, args, torch.float32, scale, "triton fp32")
    _, exact_lse = _exact_attention(*args, scale)
    torch.testing.assert_close(lse.double().cpu(), exact_lse, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_triton_split_k_matches_float64(num_splits):
    # Some splits of the short rows cover no keys at all: their (0, -inf) partials must vanish.
    args = _make_case([300, 1], [[70, 0, 2], [0, 1, 40]], 4, 2, 32, seed=1)
    out, lse = ops.cascade_decode_attention(*args, num_splits=num_splits, return_lse=True,
                                            backend="triton")
    _assert_accurate(out, args, torch.float32, 1 / math.sqrt(32), f"split-k {num_splits}")
    _, exact_lse = _exact_attention(*args, 1 / math.sqrt(32))
    torch.testing.assert_close(lse.double().cpu(), exact_lse, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_many_rows_use_several_row_blocks():
    # K * G = 12 * 8 = 96 query rows per (question, KV head): more than one 64-row block, and
    # a branch (rows 56..63 | 64..71) straddles the block boundary.
    prefix_lens, suffix_lens = [37], [[(3 * b) % 11 for b in range(12)]]
    args = _make_case(prefix_lens, suffix_lens, num_heads=16, num_kv_heads=2, head_dim=16, seed=2)
    out = ops.cascade_decode_attention(*args, backend="triton")
    _assert_accurate(out, args, torch.float32, 0.25, "triton 96 rows")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)])
def test_triton_low_precision_within_twice_eager_error(dtype):
    args = _make_case([130, 9], [[5, 0, 17], [1, 30, 2]], 4, 2, 40, dtype=dtype, seed=3)
    out = ops.cascade_decode_attention(*args, backend="triton")
    assert out.dtype == dtype
    _assert_accurate(out, args, dtype, 1 / math.sqrt(40), f"triton {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)])
def test_torch_low_precision_within_twice_eager_error(dtype):
    args = _make_case([130, 9], [[5, 0, 17], [1, 30, 2]], 4, 2, 40, dtype=dtype, seed=3)
    out = ops.cascade_decode_attention(*args, backend="torch")
    assert out.dtype == dtype
    _assert_accurate(out, args, dtype, 1 / math.sqrt(40), f"torch {dtype}")


BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
try:
    from r3v_fast.ops import cpp_backend
    CPP_BUILT = cpp_backend.available()
except ImportError:
    CPP_BUILT = False
needs_cpp = pytest.mark.skipif(not CPP_BUILT or DEVICE != "cpu", reason="needs the C++ extension (CPU)")
PAGED_BACKENDS = BACKENDS + [pytest.param("cpp", marks=needs_cpp)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_index_and_strided_views(backend):
    # A pool of 3 prefixes read by 2 questions through prefix_index, suffixes that are slices of
    # a larger-capacity buffer, and a q that is a transposed view: no copies, same result.
    gen = torch.Generator().manual_seed(4)
    num_q, num_branches, num_heads, num_kv_heads, head_dim = 2, 3, 4, 2, 24
    q = torch.randn(num_q, num_heads, num_branches, head_dim, generator=gen).transpose(1, 2)
    pool_k, pool_v = (torch.randn(3, num_kv_heads, 50, head_dim, generator=gen) for _ in range(2))
    cap_k, cap_v = (torch.randn(num_q, num_branches, num_kv_heads, 64, head_dim, generator=gen)
                    for _ in range(2))
    suffix_k, suffix_v = cap_k[..., :20, :], cap_v[..., :20, :]
    prefix_index = torch.tensor([2, 0])
    prefix_lens = torch.tensor([50, 31])
    suffix_lens = torch.tensor([[20, 0, 7], [1, 19, 20]])
    assert not q.is_contiguous() and not suffix_k.is_contiguous()
    to = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    out = ops.cascade_decode_attention(*to(q, pool_k, pool_v, prefix_lens, suffix_k, suffix_v,
                                           suffix_lens), prefix_index=prefix_index.to(DEVICE),
                                       backend=backend)
    exact, _ = _exact_attention(q, pool_k, pool_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                                1 / math.sqrt(head_dim), prefix_index)
    torch.testing.assert_close(out.double().cpu(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_states_match_float64(backend):
    args = _make_case([19, 6], [[0, 4], [11, 0]], 4, 2, 16, seed=5)
    q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens = args
    scale = 0.25
    o_p, lse_p = ops.prefix_attention(q, prefix_k, prefix_v, prefix_lens, backend=backend)
    o_s, lse_s = ops.suffix_attention(q, suffix_k, suffix_v, suffix_lens, backend=backend)
    no_suffix = torch.zeros_like(suffix_lens)
    exact_p, exact_lse_p = _exact_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
                                            no_suffix, scale)
    exact_s, exact_lse_s = _exact_attention(q, prefix_k, prefix_v, torch.zeros_like(prefix_lens),
                                            suffix_k, suffix_v, suffix_lens, scale)
    for got, want in ((o_p, exact_p), (lse_p, exact_lse_p), (o_s, exact_s), (lse_s, exact_lse_s)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    # Empty suffixes are exactly (0, -inf); merging the partials gives full attention.
    assert torch.isneginf(lse_s[0, 0]).all() and (o_s[0, 0] == 0).all()
    o, _ = ops.merge_attention_states(o_p, lse_p, o_s, lse_s, backend=backend)
    _assert_accurate(o, args, torch.float32, scale, f"{backend} prefix+suffix merge")


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_attention_states_hand_computed(backend):
    # Row 0: weights e^0 : e^{log 3} = 1 : 3 -> o = (1*[1,0] + 3*[0,1]) / 4, lse = log 4.
    # Row 1: side b empty (-inf, and its o is nan garbage) -> side a unchanged.
    # Row 2: side a empty. Row 3: both empty -> o = 0, lse = -inf.
    # Row 4: large lse values (1000, 1001) must not overflow.
    inf, nan = float("inf"), float("nan")
    o_a = torch.tensor([[1.0, 0.0], [2.0, -1.0], [nan, nan], [5.0, 5.0], [1.0, 1.0]])
    lse_a = torch.tensor([0.0, 0.7, -inf, -inf, 1000.0])
    o_b = torch.tensor([[0.0, 1.0], [nan, nan], [-3.0, 4.0], [6.0, 6.0], [3.0, -1.0]])
    lse_b = torch.tensor([math.log(3.0), -inf, -2.5, -inf, 1001.0])
    w = 1 / (1 + math.e)  # weight of side a in row 4
    want_o = torch.tensor([[0.25, 0.75], [2.0, -1.0], [-3.0, 4.0], [0.0, 0.0],
                           [w * 1 + (1 - w) * 3, w * 1 - (1 - w)]], dtype=torch.float64)
    want_lse = torch.tensor([math.log(4.0), 0.7, -2.5, -inf, 1001 + math.log1p(math.exp(-1))],
                            dtype=torch.float64)
    o, lse = ops.merge_attention_states(*(t.to(DEVICE) for t in (o_a, lse_a, o_b, lse_b)),
                                        backend=backend)
    torch.testing.assert_close(o.double().cpu(), want_o, rtol=0, atol=1e-6)
    # lse is float32: ~1e-7 relative at 1001.
    torch.testing.assert_close(lse.double().cpu(), want_lse, rtol=2e-7, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_attention_states_random_against_float64(backend):
    gen = torch.Generator().manual_seed(6)
    o_a, o_b = (torch.randn(3, 5, 40, generator=gen) for _ in range(2))
    lse_a, lse_b = (torch.randn(3, 5, generator=gen) * 4 for _ in range(2))
    lse_b[0] = float("-inf")
    o, lse = ops.merge_attention_states(*(t.to(DEVICE) for t in (o_a, lse_a, o_b, lse_b)),
                                        backend=backend)
    a, b = lse_a.double().exp(), lse_b.double().exp()
    want_o = (a[..., None] * o_a.double() + b[..., None] * o_b.double()) / (a + b)[..., None]
    torch.testing.assert_close(o.double().cpu(), want_o, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double().cpu(), (a + b).log(), rtol=0, atol=1e-5)


def test_backend_selection(monkeypatch):
    args = _make_case([4], [[2]], 2, 1, 16)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.cascade_decode_attention(*args, backend="cuda")
    with pytest.raises(ValueError, match="no 'cpp' backend"):
        ops.cascade_decode_attention(*args, backend="cpp")
    monkeypatch.setenv("R3V_BACKEND", "torch")
    assert ops._resolve_backend("auto", torch.device("cuda")) == "torch"
    assert ops._resolve_backend("triton", torch.device("cuda")) in ("triton",)  # explicit wins
    monkeypatch.setenv("R3V_BACKEND", "cpp")  # global "native CPU path" request: torch here
    assert ops._resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.delenv("R3V_BACKEND")
    assert ops._resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if TRITON_RUNNABLE:
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            ops._resolve_backend("triton", torch.device("cpu"))


def test_bad_inputs_name_the_argument():
    q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens = _make_case([4, 5], [[2], [3]])
    with pytest.raises(ValueError, match="suffix_lens must be"):
        ops.cascade_decode_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
                                     suffix_lens[0], backend="torch")
    with pytest.raises(ValueError, match="prefix_v shape"):
        ops.cascade_decode_attention(q, prefix_k, prefix_v[:, :, :2], prefix_lens, suffix_k,
                                     suffix_v, suffix_lens, backend="torch")
    with pytest.raises(ValueError, match="not a multiple of prefix KV heads"):
        ops.cascade_decode_attention(q[:, :, :3], prefix_k, prefix_v, prefix_lens, suffix_k,
                                     suffix_v, suffix_lens, backend="torch")
    with pytest.raises(ValueError, match="prefix_k dtype"):
        ops.cascade_decode_attention(q, prefix_k.double(), prefix_v, prefix_lens, suffix_k,
                                     suffix_v, suffix_lens, backend="torch")
    with pytest.raises(ValueError, match="num_splits must be"):
        ops.cascade_decode_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
                                     suffix_lens, num_splits=0, backend="torch")
    with pytest.raises(ValueError, match="pass prefix_index"):
        ops.cascade_decode_attention(q[:1], prefix_k, prefix_v, prefix_lens[:1], suffix_k[:1],
                                     suffix_v[:1], suffix_lens[:1], backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    # No questions left in the batch (every branch finished): an empty result, no launch error.
    q = torch.zeros(0, 3, 4, 16, device=DEVICE)
    prefix = torch.zeros(0, 2, 5, 16, device=DEVICE)
    suffix = torch.zeros(0, 3, 2, 4, 16, device=DEVICE)
    lens_p = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    lens_s = torch.zeros(0, 3, dtype=torch.int32, device=DEVICE)
    out = ops.cascade_decode_attention(q, prefix, prefix, lens_p, suffix, suffix, lens_s, backend=backend)
    assert out.shape == (0, 3, 4, 16)


def test_registered_op_passes_opcheck():
    """r3v::cascade_decode_attention: schema, fake kernel and dispatch agree (torch.library)."""
    from r3v_fast.ops import cascade_decode_attention as exported

    assert exported is ops.cascade_decode_attention
    q, pk, pv, plen, sk, sv, slen = _make_case([4, 5], [[2, 0], [3, 1]])
    index = torch.tensor([1, 0], device=plen.device)
    for prefix_index, lens in ((None, plen), (index, plen[index])):   # read only valid prefix slots
        args = (q, pk, pv, lens, sk, sv, slen, prefix_index, 0.25, 0, "torch")
        torch.library.opcheck(torch.ops.r3v.cascade_decode_attention.default, args)


# ---------------------------------------------------------------------------- paged layout
def _tokens(pool, table, length):
    """The first `length` tokens of a block-table row: [Hkv, length, Dh] (python loop)."""
    block_size = pool.shape[2]
    return torch.stack([pool[int(table[t // block_size]), :, t % block_size] for t in range(length)], 1) \
        if length else pool.new_zeros(pool.shape[1], 0, pool.shape[3])


def _exact_paged(q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens, scale):
    """float64 attention of every listed slot over its row's prefix tokens then its own, one
    (slot, head) at a time; unlisted slots: o = 0, lse = -inf."""
    num_slots, num_heads, _ = q.shape
    group = num_heads // k_pool.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float64)
    k_pool, v_pool, q = k_pool.double().cpu(), v_pool.double().cpu(), q.double().cpu()
    for r in range(question_slots.shape[0]):
        for s in question_slots[r].tolist():
            if s < 0:
                continue
            keys = torch.cat([_tokens(k_pool, prefix_tables[r], int(prefix_lens[r])),
                              _tokens(k_pool, slot_tables[s], int(slot_lens[s]))], 1)     # [Hkv, T, Dh]
            values = torch.cat([_tokens(v_pool, prefix_tables[r], int(prefix_lens[r])),
                                _tokens(v_pool, slot_tables[s], int(slot_lens[s]))], 1)
            for h in range(num_heads):
                if keys.shape[1] == 0:
                    continue
                scores = keys[h // group] @ q[s, h] * scale
                lse[s, h] = torch.logsumexp(scores, 0)
                out[s, h] = torch.softmax(scores, 0) @ values[h // group]
    return out, lse


def _eager_paged(q, k_pool, v_pool, question_slots, prefix_tables, prefix_lens, slot_tables, slot_lens, scale):
    """The same in the inputs' dtype: the eager-error yardstick."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k_pool.shape[1]
    for r in range(question_slots.shape[0]):
        for s in question_slots[r].tolist():
            if s < 0:
                continue
            keys = torch.cat([_tokens(k_pool, prefix_tables[r], int(prefix_lens[r])),
                              _tokens(k_pool, slot_tables[s], int(slot_lens[s]))], 1)
            values = torch.cat([_tokens(v_pool, prefix_tables[r], int(prefix_lens[r])),
                                _tokens(v_pool, slot_tables[s], int(slot_lens[s]))], 1)
            keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
            scores = (keys @ q[s].unsqueeze(-1)).squeeze(-1) * scale                 # [H, T]
            out[s] = (torch.softmax(scores, -1).unsqueeze(1) @ values).squeeze(1)
    return out


def _make_paged_case(question_slots, prefix_lens, slot_lens, *, block_size, num_heads=4, num_kv_heads=2,
                     head_dim=16, dtype=torch.float32, seed=0, spare_blocks=5):
    """Random pool whose blocks are handed out in a shuffled order (tables are not monotone);
    rows 0 and 1 share their first prefix blocks when both have a prefix (the select-branch
    case: two rows reading one stored prefix). Every pool position no table row covers within
    its length holds garbage (keys 1e4, values nan), so reading one would show."""
    gen = torch.Generator().manual_seed(seed)
    question_slots = torch.tensor(question_slots, dtype=torch.int32)
    prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32)
    slot_lens = torch.tensor(slot_lens, dtype=torch.int32)
    num_rows, num_slots = len(prefix_lens), len(slot_lens)
    blocks_of = lambda n: -(-n // block_size)  # noqa: E731
    prefix_blocks = max(blocks_of(int(prefix_lens.max())), 1)
    slot_blocks = max(blocks_of(int(slot_lens.max())), 1)
    total = num_rows * prefix_blocks + num_slots * slot_blocks + spare_blocks
    order = torch.randperm(total, generator=gen)
    prefix_tables = order[:num_rows * prefix_blocks].view(num_rows, prefix_blocks).clone()
    if num_rows > 1 and prefix_lens[0] > 0 and prefix_lens[1] > 0:
        shared = min(blocks_of(int(prefix_lens[0])), blocks_of(int(prefix_lens[1])))
        prefix_tables[1, :shared] = prefix_tables[0, :shared]
        prefix_lens[1] = min(int(prefix_lens[1]), int(prefix_lens[0]))  # read only written tokens
    slot_tables = order[num_rows * prefix_blocks:][:num_slots * slot_blocks].view(num_slots, slot_blocks)
    k_pool = torch.full((total, num_kv_heads, block_size, head_dim), 1e4)
    v_pool = torch.full((total, num_kv_heads, block_size, head_dim), float("nan"))
    for table, length in [*zip(prefix_tables, prefix_lens), *zip(slot_tables, slot_lens)]:
        for t in range(int(length)):
            block, within = int(table[t // block_size]), t % block_size
            k_pool[block, :, within] = torch.randn(num_kv_heads, head_dim, generator=gen)
            v_pool[block, :, within] = torch.randn(num_kv_heads, head_dim, generator=gen)
    q = torch.randn(num_slots, num_heads, head_dim, generator=gen)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return [to(q.to(dtype)), to(k_pool.to(dtype)), to(v_pool.to(dtype)), to(question_slots),
            to(prefix_tables.int()), to(prefix_lens), to(slot_tables.int()), to(slot_lens)]


def _assert_paged_accurate(out, args, dtype, scale, what):
    exact, _ = _exact_paged(*[t.cpu() for t in args], scale)
    eager = _eager_paged(*[t.cpu() for t in args], scale)
    listed = sorted(s for s in args[3].flatten().tolist() if s >= 0)
    err = (out.double().cpu()[listed] - exact[listed]).abs().max().item()
    eager_err = (eager.double()[listed] - exact[listed]).abs().max().item()
    bound = 2 * eager_err + FLOOR[dtype]
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (eager {eager_err:.3g})"
    unlisted = sorted(set(range(out.shape[0])) - set(listed))
    assert (out.cpu()[unlisted] == 0).all(), f"{what}: unlisted slots must be 0"


# (name, question_slots [R][W], prefix_lens [R], slot_lens [S], block size, H, Hkv, Dh)
PAGED_CASES = [
    ("one_question", [[0, 1, 2]], [20], [3, 0, 17], 16, 4, 2, 16),
    ("holes_and_unlisted", [[4, -1, 0], [-1, 2, -1]], [37, 5], [9, 1, 30, 5, 0, 8], 8, 4, 2, 16),
    ("block_size_1", [[1, 0], [2, 3]], [6, 3], [2, 5, 0, 4], 1, 4, 2, 16),
    ("head_dim_40_mha", [[0], [1], [2]], [50, 1, 17], [0, 33, 2], 16, 4, 4, 40),
    ("long_prefix_k8", [[7, 6, 5, 4, 3, 2, 1, 0]], [300], [0, 1, 2, 3, 5, 8, 13, 21], 32, 4, 2, 24),
    ("no_prefix", [[0, 1], [2, -1]], [0, 0], [4, 0, 7], 4, 4, 2, 16),
]
PAGED_IDS = [c[0] for c in PAGED_CASES]


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("case", PAGED_CASES, ids=PAGED_IDS)
def test_paged_matches_float64_attention(case, backend):
    _, slots, prefix_lens, slot_lens, block_size, num_heads, num_kv_heads, head_dim = case
    args = _make_paged_case(slots, prefix_lens, slot_lens, block_size=block_size, num_heads=num_heads,
                            num_kv_heads=num_kv_heads, head_dim=head_dim)
    scale = 0.3
    out, lse = ops.paged_cascade_decode_attention(*args, scale=scale, return_lse=True, backend=backend)
    assert out.shape == args[0].shape and out.dtype == torch.float32 and lse.dtype == torch.float32
    _assert_paged_accurate(out, args, torch.float32, scale, f"{backend} paged")
    _, exact_lse = _exact_paged(*[t.cpu() for t in args], scale)
    torch.testing.assert_close(lse.double().cpu(), exact_lse, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("num_splits", [2, 3])
def test_paged_triton_split_k_matches_float64(num_splits):
    args = _make_paged_case([[0, 1, 2], [3, -1, -1]], [200, 1], [70, 0, 2, 40], block_size=16, head_dim=32, seed=1)
    out, lse = ops.paged_cascade_decode_attention(*args, num_splits=num_splits, return_lse=True, backend="triton")
    _assert_paged_accurate(out, args, torch.float32, 1 / math.sqrt(32), f"paged split-k {num_splits}")
    _, exact_lse = _exact_paged(*[t.cpu() for t in args], 1 / math.sqrt(32))
    torch.testing.assert_close(lse.double().cpu(), exact_lse, rtol=1e-5, atol=1e-5)


@needs_triton
def test_paged_triton_many_rows_use_several_row_blocks():
    # 12 slots x G = 8 query rows = 96 rows of one question: two 64-row blocks.
    args = _make_paged_case([list(range(12))], [37], [(3 * b) % 11 for b in range(12)], block_size=8,
                            num_heads=16, num_kv_heads=2, head_dim=16, seed=2)
    out = ops.paged_cascade_decode_attention(*args, backend="triton")
    _assert_paged_accurate(out, args, torch.float32, 0.25, "paged 96 rows")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)])
def test_paged_low_precision_within_twice_eager_error(dtype, backend):
    args = _make_paged_case([[0, 2], [1, -1]], [130, 9], [5, 30, 17], block_size=16, head_dim=40, dtype=dtype, seed=3)
    out = ops.paged_cascade_decode_attention(*args, backend=backend)
    assert out.dtype == dtype
    _assert_paged_accurate(out, args, dtype, 1 / math.sqrt(40), f"{backend} paged {dtype}")


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_paged_equals_the_dense_cascade_on_the_same_tokens(backend):
    """Copying the blocks into the dense layout and running the dense op gives the same result."""
    args = _make_paged_case([[2, 0, 1], [3, 4, -1]], [45, 20], [3, 0, 9, 12, 1], block_size=8, seed=4)
    q, k_pool, v_pool, slots, prefix_tables, prefix_lens, slot_tables, slot_lens = args
    paged = ops.paged_cascade_decode_attention(*args, backend=backend)
    dense_slots = slots.long().clamp_min(0)
    gather = lambda pool, tables: pool[tables.long()].movedim(-3, -4).flatten(-3, -2)  # noqa: E731
    dense = ops.cascade_decode_attention(
        q[dense_slots], gather(k_pool, prefix_tables), gather(v_pool, prefix_tables), prefix_lens,
        gather(k_pool, slot_tables[dense_slots]), gather(v_pool, slot_tables[dense_slots]),
        torch.where(slots >= 0, slot_lens[dense_slots], 0),
        backend="torch" if backend == "cpp" else backend)                           # the dense op has no cpp
    listed = slots >= 0
    torch.testing.assert_close(paged[dense_slots[listed]], dense[listed], rtol=1e-6, atol=1e-6)


@needs_cpp
def test_paged_cpp_takes_views_and_rejects_what_it_cannot_run():
    """Column slices of the tables (what the sampler's cache passes) give the same result as
    copies; an explicit cpp request in float16 raises, "auto" then takes the torch path."""
    args = _make_paged_case([[0, 2], [1, -1]], [40, 9], [5, 30, 17], block_size=8, seed=6)
    q, k_pool, v_pool, slots, prefix_tables, prefix_lens, slot_tables, slot_lens = args
    wide = lambda t: torch.cat([t, torch.zeros_like(t)], 1)[:, :t.shape[1]]  # noqa: E731  a strided view
    views = (q, k_pool, v_pool, slots, wide(prefix_tables), prefix_lens, wide(slot_tables), slot_lens)
    assert not views[4].is_contiguous()
    torch.testing.assert_close(ops.paged_cascade_decode_attention(*views, backend="cpp"),
                               ops.paged_cascade_decode_attention(*args, backend="cpp"), rtol=0, atol=0)
    half = [t.half() if t.is_floating_point() else t for t in args]
    with pytest.raises(ValueError, match="cpp backend takes float32"):
        ops.paged_cascade_decode_attention(*half, backend="cpp")
    assert ops.paged_cascade_decode_attention(*half, backend="auto").dtype == torch.float16


def test_paged_bad_inputs_name_the_argument():
    args = _make_paged_case([[0, 1]], [5], [2, 3], block_size=4)
    q, k_pool, v_pool, slots, prefix_tables, prefix_lens, slot_tables, slot_lens = args
    with pytest.raises(ValueError, match="slot_lens must be"):
        ops.paged_cascade_decode_attention(q, k_pool, v_pool, slots, prefix_tables, prefix_lens, slot_tables,
                                           slot_lens[:1], backend="torch")
    with pytest.raises(ValueError, match="prefix_tables must be"):
        ops.paged_cascade_decode_attention(q, k_pool, v_pool, slots, prefix_tables[:0], prefix_lens, slot_tables,
                                           slot_lens, backend="torch")
    with pytest.raises(ValueError, match="v_pool shape"):
        ops.paged_cascade_decode_attention(q, k_pool, v_pool[:, :1], slots, prefix_tables, prefix_lens,
                                           slot_tables, slot_lens, backend="torch")
    with pytest.raises(ValueError, match="question_slots must be integer"):
        ops.paged_cascade_decode_attention(q, k_pool, v_pool, slots.float(), prefix_tables, prefix_lens,
                                           slot_tables, slot_lens, backend="torch")


def test_paged_registered_op_passes_opcheck():
    from r3v_fast.ops import paged_cascade_decode_attention as exported

    assert exported is ops.paged_cascade_decode_attention
    args = _make_paged_case([[0, -1], [1, 2]], [5, 3], [2, 0, 4], block_size=4)
    for t in (args[1], args[2]):   # opcheck compares outputs: no nan garbage in this pool
        t.nan_to_num_(0.0)
    torch.library.opcheck(torch.ops.r3v.paged_cascade_decode_attention.default, (*args, 0.25, 0, "torch"))
