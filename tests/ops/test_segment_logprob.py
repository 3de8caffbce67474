"""Tests for r3v_fast.ops.token_logprob / segment_logprob on every backend that can run here.

The oracle is a float64 full-logits computation written out below (log_softmax + gather,
gradients by autograd), independent of the package. Tolerance (docs/architecture.md, "Numerics and tests"): the max error,
relative to the largest reference value, must be <= max(2 x the same-dtype eager error, floor)
with floors fp32 1e-5, fp16 1e-3, bf16 1e-2. The "eager" run is the same few lines in the
input dtype. Backends: "torch" always, "cpp" when the extension is built, "triton" on CUDA or
under TRITON_INTERPRET=1 (the interpreter is slow: shapes stay small, runs stay few).
Tests that need a GPU (bf16, T·V > 2^31, no-sync check, inductor) skip without CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import pytest
import torch

from r3v_fast.ops import segment_logprob, token_logprob

backends = importlib.import_module("r3v_fast.ops.segment_logprob_backends")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _backend_param(name):
    runnable = {"torch": True, "cpp": backends.cpp_available() and not CUDA,
                "triton": backends.triton_available() and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")}
    return pytest.param(name, marks=pytest.mark.skipif(not runnable[name], reason=f"{name} backend cannot run here"))


BACKENDS = [_backend_param(name) for name in ("torch", "cpp", "triton")]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


# ---------------------------------------------------------------- oracle (independent)
def oracle_token_logprob(hidden, weight, targets, bias=None, softcap=None, ignore_index=-100, dtype=torch.float64):
    """Full [T, V] logits in `dtype`: float64 = the reference, the input dtype = eager baseline."""
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    z = h @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    t = targets.reshape(-1)
    picked = torch.log_softmax(z, dim=-1).gather(1, t.clamp(min=0)[:, None])[:, 0]
    return torch.where(t != ignore_index, picked, torch.zeros_like(picked))


def oracle_segment_sum(token_values, segment_ids, num_segments):
    onehot = segment_ids.reshape(-1)[None, :] == torch.arange(num_segments, device=segment_ids.device)[:, None]
    return onehot.to(token_values.dtype) @ token_values  # [S]


def run_with_grads(fn, tensors, grad_out):
    """fn(*leaves) and the gradients of <fn, grad_out> w.r.t. the leaves that require grad."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    out = fn(*leaves)
    diff = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, diff, grad_out.to(out.dtype)) if diff else []
    return out.detach(), list(grads)


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def assert_within_budget(name, got, ref, eager, dtype):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err, budget = rel_err(got, ref), max(2 * rel_err(eager, ref), FLOOR[dtype])
    assert err <= budget, f"{name}: error {err:.3e} > budget {budget:.3e} (eager {rel_err(eager, ref):.3e})"


# ---------------------------------------------------------------- inputs
def make_inputs(dtype, *, T=47, D=123, V=507, bias=False, layout="contiguous", ignore_every=4, seed=0):
    """hidden, weight, bias, targets with logits of realistic spread (std ~2).

    layout: "contiguous" [T, D]; "strided" [T, D] viewed out of [T, 2D] (hidden stride 2);
    "leading" [2, T//2, D] transposed out of [T//2, 2, D] (leading dims, not viewable as 2D).
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        hidden = torch.randn(T, 2 * D, generator=g).to(dtype)[:, ::2]
    elif layout == "leading":
        hidden = torch.randn(T // 2, 2, D, generator=g).to(dtype).transpose(0, 1)
    else:
        hidden = torch.randn(T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 2 / D ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, hidden.shape[:-1], generator=g)
    if layout == "strided":  # bias and targets with stride 2 as well
        b = None if b is None else torch.stack([b, -b], 1)[:, 0]
        targets = torch.stack([targets, -targets], 1)[:, 0]
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    move = (lambda t: None if t is None else t.to(DEVICE))
    return move(hidden), move(weight), move(b), move(targets)


VARIANTS = {  # name: (make_inputs kwargs, softcap)
    "plain": (dict(ignore_every=0), None),  # every target valid: the no-compaction fast path
    "bias_strided": (dict(bias=True, layout="strided"), None),
    "softcap_bias_leading": (dict(bias=True, layout="leading"), 5.0),
}


# ---------------------------------------------------------------- correctness
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprob_matches_float64(backend, dtype, variant):
    kwargs, softcap = VARIANTS[variant]
    hidden, weight, bias, targets = make_inputs(dtype, **kwargs)
    for t in (hidden, weight, bias):
        if t is not None:
            t.requires_grad_(True)
    grad_out = torch.randn(targets.numel(), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    inputs = (hidden, weight, bias)

    got, got_grads = run_with_grads(lambda h, w, b: token_logprob(
        h, w, targets, bias=b, softcap=softcap, backend=backend), inputs, grad_out)
    ref, ref_grads = run_with_grads(lambda h, w, b: oracle_token_logprob(
        h, w, targets, b, softcap), inputs, grad_out)
    eager, eager_grads = run_with_grads(lambda h, w, b: oracle_token_logprob(
        h, w, targets, b, softcap, dtype=dtype), inputs, grad_out)

    assert got.dtype == torch.float32 and got.shape == (targets.numel(),)
    assert torch.all(got[targets.reshape(-1) == -100] == 0)
    assert_within_budget("logp", got, ref, eager, dtype)
    for name, g, r, e, leaf in zip(("d_hidden", "d_weight", "d_bias"), got_grads, ref_grads, eager_grads,
                                   [t for t in inputs if t is not None]):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_within_budget(name, g, r, e, dtype)


TRITON = _backend_param("triton")


@pytest.mark.parametrize("dw_by_torch_mm", [False, True], ids=["dw_triton", "dw_mm"])
@pytest.mark.parametrize("backend", [TRITON])
def test_triton_dw_paths_match_float64(backend, dw_by_torch_mm, monkeypatch):
    # dW by the Triton GEMM or by torch.mm over all N compacted rows (KernelConfig.dw_by_torch_mm:
    # G rows past n_valid must then be written as zeros). Every 4th target is ignored, so the
    # compacted order differs from the input order and rows past n_valid exist.
    kernels = importlib.import_module("r3v_fast.kernels.segment_logprob")
    base = kernels.default_config
    monkeypatch.setattr(kernels, "default_config",
                        lambda dtype: dataclasses.replace(base(dtype), dw_by_torch_mm=dw_by_torch_mm))
    dtype = torch.float32
    hidden, weight, _, targets = make_inputs(dtype, seed=3)
    hidden = (hidden * 3).requires_grad_(True)  # big logits: G rows past n_valid would not be 0 by chance
    weight.requires_grad_(True)
    grad_out = torch.randn(targets.numel(), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    inputs = (hidden, weight)
    got, got_grads = run_with_grads(lambda h, w: token_logprob(h, w, targets, backend=backend), inputs, grad_out)
    ref, ref_grads = run_with_grads(lambda h, w: oracle_token_logprob(h, w, targets), inputs, grad_out)
    eager, eager_grads = run_with_grads(lambda h, w: oracle_token_logprob(h, w, targets, dtype=dtype),
                                        inputs, grad_out)
    assert_within_budget("logp", got, ref, eager, dtype)
    for name, g, r, e in zip(("d_hidden", "d_weight"), got_grads, ref_grads, eager_grads):
        assert_within_budget(name, g, r, e, dtype)

    # Non-finite hidden states at ignored positions (e.g. padding) count nowhere, in any dW path.
    poisoned = hidden.detach().clone()
    poisoned[targets == -100] = float("nan")
    got2, got2_grads = run_with_grads(lambda h, w: token_logprob(h, w, targets, backend=backend),
                                      (poisoned.requires_grad_(True), weight), grad_out)
    assert torch.equal(got2, got) and torch.isfinite(got2_grads[1]).all()
    assert torch.equal(got2_grads[1], got_grads[1])


@pytest.mark.parametrize("wanted", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_for_a_subset_of_inputs(backend, wanted):
    hidden, weight, bias, targets = make_inputs(torch.float32, bias=True)
    named = {"hidden": hidden, "weight": weight, "bias": bias}
    named[wanted].requires_grad_(True)
    grad_out = torch.randn(targets.numel(), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    token_logprob(hidden, weight, targets, bias=bias, backend=backend).backward(grad_out)
    ref, (ref_grad,) = run_with_grads(lambda h, w, b: oracle_token_logprob(h, w, targets, b),
                                      (hidden, weight, bias), grad_out)
    for name, t in named.items():
        assert (t.grad is not None) == (name == wanted), name
    assert rel_err(named[wanted].grad, ref_grad) <= FLOOR[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_empty_inputs_give_zeros(backend):
    hidden, weight, bias, targets = make_inputs(torch.float32, T=20, bias=True)
    targets = torch.full_like(targets, -100)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    logp = token_logprob(hidden, weight, targets, bias=bias, backend=backend)
    sums = segment_logprob(hidden, weight, targets, torch.zeros_like(targets), 3, bias=bias, backend=backend)
    (logp.sum() + sums.sum()).backward()
    assert torch.equal(logp, torch.zeros(20, device=DEVICE)) and torch.equal(sums, torch.zeros(3, device=DEVICE))
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))
    empty = token_logprob(hidden[:0], weight, targets[:0], bias=bias, backend=backend)
    assert empty.shape == (0,)
    assert segment_logprob(hidden[:0], weight, targets[:0], targets[:0], 2, backend=backend).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_logprob_unsorted_empty_and_negative_segments(backend, dtype):
    hidden, weight, bias, targets = make_inputs(dtype, bias=True, layout="strided", seed=3)
    num_segments = 7  # segments 1, 4 and 6 stay empty
    g = torch.Generator().manual_seed(4)
    choices = torch.tensor([0, 2, 3, 5, -1, -7, 9])  # -1, -7: no segment; 9 >= num_segments: nowhere
    segment_ids = choices[torch.randint(0, len(choices), (targets.numel(),), generator=g)].to(DEVICE)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    grad_out = torch.randn(num_segments, generator=g).to(DEVICE)

    def fused(h, w, b):
        return segment_logprob(h, w, targets, segment_ids, num_segments, bias=b, backend=backend)

    def reference(dtype_):
        return lambda h, w, b: oracle_segment_sum(oracle_token_logprob(h, w, targets, b, dtype=dtype_),
                                                  segment_ids, num_segments)

    got, got_grads = run_with_grads(fused, (hidden, weight, bias), grad_out)
    ref, ref_grads = run_with_grads(reference(torch.float64), (hidden, weight, bias), grad_out)
    eager, eager_grads = run_with_grads(reference(dtype), (hidden, weight, bias), grad_out)
    assert got.dtype == torch.float32 and got.shape == (num_segments,)
    assert got[[1, 4, 6]].tolist() == [0.0, 0.0, 0.0]
    assert_within_budget("segment sums", got, ref, eager, dtype)
    for name, g_, r, e in zip(("d_hidden", "d_weight", "d_bias"), got_grads, ref_grads, eager_grads):
        assert_within_budget(name, g_, r, e, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend):
    hidden, weight, bias, targets = make_inputs(torch.float32, bias=True, seed=5)
    segment_ids = (torch.arange(targets.numel(), device=DEVICE) * 7) % 5 - 1  # unsorted, some -1
    grad_out = torch.randn(4, generator=torch.Generator().manual_seed(6)).to(DEVICE)

    def once():
        return run_with_grads(lambda h, w, b: segment_logprob(h, w, targets, segment_ids, 4, bias=b, softcap=4.0,
                                                              backend=backend),
                              (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()), grad_out)

    (out1, grads1), (out2, grads2) = once(), once()
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


# ---------------------------------------------------------------- peaked distributions
# A trained model puts p > 0.99 on most targets. The softmax tail is then a sum of many terms
# far below one ulp of the running sum; an fp32 sum that is already ~1 drops them (issue 16:
# the cpp backend returned 0.0 for the case below). Checked per token, in absolute terms.
def peaked_inputs(T, V, *, D0=32, p_range=(0.99, 0.999), seed=0):
    """hidden [T, D0 + T], weight [V, D0 + T], targets [T] whose float64 target probability
    lies in p_range: random logits (std 2) plus, through a private hidden coordinate per token,
    a boost of the target logit computed in float64 to reach a drawn probability."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.zeros(T, D0 + T, dtype=torch.float64)
    weight = torch.zeros(V, D0 + T, dtype=torch.float64)
    hidden[:, :D0] = torch.randn(T, D0, generator=g, dtype=torch.float64)
    weight[:, :D0] = torch.randn(V, D0, generator=g, dtype=torch.float64) * 2 / D0 ** 0.5
    targets = torch.randperm(V, generator=g)[:T]  # distinct: each boost coordinate hits one row
    base = hidden @ weight.T  # [T, V]
    rest = base.clone()
    rest[torch.arange(T), targets] = float("-inf")
    p = p_range[0] + (p_range[1] - p_range[0]) * torch.rand(T, generator=g, dtype=torch.float64)
    boost = torch.log(p / (1 - p)) + torch.logsumexp(rest, 1) - base[torch.arange(T), targets]  # [T]
    hidden[torch.arange(T), D0 + torch.arange(T)] = boost
    weight[targets, D0 + torch.arange(T)] = 1.0
    return hidden.float().to(DEVICE), weight.float().to(DEVICE), targets.to(DEVICE)


def _interpreter_speedup(backend, monkeypatch):
    # The interpreter pays per tile: wider vocab tiles keep V = 151,936 at seconds, not minutes.
    # Tiles still add into the running sum 149 times per token block.
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        kernels = importlib.import_module("r3v_fast.kernels.segment_logprob")
        monkeypatch.setattr(kernels, "default_config",
                            lambda dtype: dataclasses.replace(kernels.INTERPRETER_CONFIG, block_v=1024))


@pytest.mark.parametrize("V", [32_000, 151_936])
@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_logits_per_token_error(backend, V, monkeypatch):
    _interpreter_speedup(backend, monkeypatch)
    hidden, weight, targets = peaked_inputs(8, V)
    ref = oracle_token_logprob(hidden, weight, targets)  # float64 logits of the fp32 inputs
    assert ref.exp().min() > 0.99
    eager = oracle_token_logprob(hidden, weight, targets, dtype=torch.float32).double()
    got = token_logprob(hidden, weight, targets, backend=backend).double()
    err, bound = (got - ref).abs(), 2 * (eager - ref).abs().max() + FLOOR[torch.float32]
    assert err.max() <= bound, f"per-token error {err.tolist()} > bound {bound:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_reproduction_one_dominant_logit(backend, monkeypatch):
    """Issue 16: logits 20 at v = 0 and 0 elsewhere, V = 151,936: logp = -log1p((V-1)·e^-20).

    The logits are exact in fp32, so the only error left is the summation's: the check is
    relative to the NLL (3.1e-4) plus one ulp-level term for log(sum) near 1. Before the fix:
    cpp 0.0, triton -3.05e-4, torch (fp32 logsumexp, z_t - lse) -3.128e-4.
    """
    import math

    _interpreter_speedup(backend, monkeypatch)
    V = 151_936
    places = [0, V // 2, V - 1]  # the dominant logit first, mid-way, last (max found late)
    # Token k sees logits 20 at places[k] and 0 elsewhere (hidden e_k, weight column k), once
    # with the dominant entry as its target, once with the entry after it (a tail target).
    hidden = torch.eye(3, device=DEVICE).repeat(2, 1)  # [6, 3]
    weight = torch.zeros(V, 3, device=DEVICE)
    weight[places, [0, 1, 2]] = 20.0
    targets = torch.tensor(places + [(k + 1) % V for k in places], device=DEVICE)
    exact = -math.log1p((V - 1) * math.exp(-20.0))
    got = token_logprob(hidden, weight, targets, backend=backend).tolist()
    for k, where in enumerate(places):
        assert abs(got[k] - exact) <= 2e-7 + 1e-3 * abs(exact), f"dominant logit at {where}: {got[k]} vs {exact}"
        assert abs(got[3 + k] - (exact - 20.0)) <= 4e-6, f"tail target next to {where}: {got[3 + k]}"


# ---------------------------------------------------------------- registration, compile
def _tiny(seed=7, T=9, D=20, V=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.3).to(DEVICE).requires_grad_()
    bias = torch.randn(V, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g).to(DEVICE)
    targets[2] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, bias, targets = _tiny()
    ops = torch.ops.r3v
    torch.library.opcheck(ops.token_logprob.default, (hidden, weight, targets, bias, -100, 0.0, backend))
    torch.library.opcheck(ops.token_logprob.default, (hidden, weight, targets, None, -100, 3.0, backend))
    lse = torch.randn(hidden.shape[0], device=DEVICE)
    torch.library.opcheck(ops.token_logprob_backward.default,
                          (torch.randn_like(lse), hidden.detach(), weight.detach(), targets, bias.detach(), lse,
                           -100, 0.0, backend, True, False, True))
    values = torch.randn(hidden.shape[0], device=DEVICE, requires_grad=True)
    segment_ids = torch.tensor([0, 2, -1, 2, 5, 1, 0, 0, 1], device=DEVICE)
    torch.library.opcheck(ops.segment_sum.default, (values, segment_ids, 4, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """fullgraph tracing through the registered ops (fake kernels + autograd formulas).

    On the CPU the graph runs with the "aot_eager" compiler: the ops are opaque either way,
    and Inductor's C++ build would cost about a minute here. CUDA tests Inductor below.
    """
    hidden, weight, bias, targets = _tiny()
    segment_ids = torch.tensor([0, 2, -1, 2, 5, 1, 0, 0, 1], device=DEVICE)
    weights = torch.arange(4.0, device=DEVICE)

    def loss(h, w, b):
        return (segment_logprob(h, w, targets, segment_ids, 4, bias=b, softcap=2.0, backend=backend) * weights).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out, grads = run_with_grads(compiled, (hidden, weight, bias), torch.tensor(1.0))
    ref, ref_grads = run_with_grads(loss, (hidden, weight, bias), torch.tensor(1.0))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- backend choice, bad input
def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("R3V_BACKEND", raising=False)
    assert backends.resolve_backend("auto", cpu) == ("cpp" if backends.cpp_available() else "torch")
    if backends.triton_available():
        assert backends.resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv("R3V_BACKEND", "torch")
    assert backends.resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("R3V_BACKEND", "fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        backends.resolve_backend("auto", cpu)
    monkeypatch.delenv("R3V_BACKEND")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        backends.resolve_backend("cpp", torch.device("cuda"))
    if not backends.cpp_available():
        with pytest.raises(RuntimeError, match="not built"):
            backends.resolve_backend("cpp", cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        backends.resolve_backend("triton", cpu)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, bias, targets = make_inputs(torch.float32, T=8, D=16, V=32)
    hidden, weight, targets = hidden.cpu(), weight.cpu(), targets.cpu()
    cases = [
        (lambda: token_logprob(hidden[:, :15], weight, targets), "hidden last dim 15 != weight dim D=16"),
        (lambda: token_logprob(hidden, weight, targets.float()), "targets must be an integer tensor"),
        (lambda: token_logprob(hidden, weight, targets[:5]), "targets shape"),
        (lambda: token_logprob(hidden, weight, targets, bias=torch.zeros(31)), "bias must be"),
        (lambda: token_logprob(hidden, weight, targets, softcap=0.0), "softcap must be"),
        (lambda: token_logprob(hidden, weight, targets, backend="gpu"), "unknown backend 'gpu'"),
        (lambda: token_logprob(hidden, weight, targets.index_fill(0, torch.tensor([5]), 40)),
         r"targets\[5\] = 40 is outside the vocabulary \[0, 32\)"),
        (lambda: segment_logprob(hidden, weight, targets, targets[:4], 2), "segment_ids shape"),
        (lambda: segment_logprob(hidden, weight, targets, targets, -1), "num_segments must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------- GPU only
@needs_cuda
def test_cuda_forward_backward_do_not_sync():
    hidden, weight, bias, targets = make_inputs(torch.bfloat16, bias=True)
    segment_ids = torch.arange(targets.numel(), device=DEVICE) % 3
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    segment_logprob(hidden, weight, targets, segment_ids, 3, bias=bias)  # warm-up: Triton compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = segment_logprob(hidden, weight, targets, segment_ids, 3, bias=bias, backend="triton")
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_out_of_range_targets_give_nan():
    hidden, weight, _, targets = make_inputs(torch.float32, T=8, D=16, V=32)
    targets[3] = 99
    out = token_logprob(hidden, weight, targets, backend="triton")
    assert torch.isnan(out[3]) and not torch.isnan(out[torch.arange(8) != 3]).any()


@needs_cuda
def test_cuda_int64_offsets_large_token_times_vocab():
    """T·V > 2^31: every index into token-by-vocab space must be int64."""
    from r3v_fast.reference import segment_logprob as reference

    T, D, V = 16_400, 64, 131_073  # T·V = 2.15e9
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, D, device="cuda", generator=g) / 4).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (T,), device="cuda", generator=g)
    targets[::3] = -100
    grad_out = torch.randn(T, device="cuda", generator=g)
    out = token_logprob(hidden, weight, targets, backend="triton")
    out.backward(grad_out)
    valid = targets != -100
    h64, w64 = hidden.detach().double()[valid], weight.detach().double()
    ref, lse = reference.token_logprob_fwd(h64, w64, None, targets[valid], 0.0)
    d_h, d_w, _ = reference.token_logprob_bwd(h64, w64, None, targets[valid], lse, grad_out.double()[valid], 0.0,
                                              True, True, False)
    assert rel_err(out[valid], ref) <= FLOOR[torch.float32]
    assert torch.all(out[~valid] == 0)
    assert rel_err(hidden.grad[valid], d_h) <= FLOOR[torch.bfloat16]
    assert rel_err(weight.grad, d_w) <= FLOOR[torch.bfloat16]


@needs_cuda
def test_cuda_inductor_fullgraph():
    hidden, weight, bias, targets = _tiny()

    def loss(h, w, b):
        return token_logprob(h, w, targets, bias=b, backend="triton").sum()

    out, grads = run_with_grads(torch.compile(loss, fullgraph=True), (hidden, weight, bias), torch.tensor(1.0))
    ref, ref_grads = run_with_grads(loss, (hidden, weight, bias), torch.tensor(1.0))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
