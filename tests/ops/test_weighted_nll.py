"""Tests for r3v_fast.ops.weighted_nll on every backend that can run here.

The oracle is float64 full logits written out below (log_softmax, gather, weighted sum,
gradients by autograd), independent of the package. Tolerance (docs/architecture.md,
"Tests"): the max error, relative to the largest reference value, must be <= max(2 x the
same-dtype eager error, floor) with floors fp32 1e-5, fp16 1e-3, bf16 1e-2; the eager run is
the same few lines in the input dtype. Backends: "torch" always, "cpp" when the extension is built, "triton" on CUDA or
under TRITON_INTERPRET=1 (its interpreter config uses 16-token chunks, so T = 47 spans three).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os

import pytest
import torch

from r3v_fast.ops import token_logprob, weighted_nll

backends = importlib.import_module("r3v_fast.ops.weighted_nll_backends")
seg_backends = importlib.import_module("r3v_fast.ops.segment_logprob_backends")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _backend_param(name):
    runnable = {"torch": True, "cpp": seg_backends.cpp_available() and not CUDA,
                "triton": seg_backends.triton_available() and (CUDA or INTERPRET)}
    return pytest.param(name, marks=pytest.mark.skipif(not runnable[name], reason=f"{name} backend cannot run here"))


BACKENDS = [_backend_param(name) for name in ("torch", "cpp", "triton")]
TRITON = _backend_param("triton")
# bf16 arithmetic runs on CUDA only; on the CPU the torch backend still runs bf16 matmuls.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtype_runs(backend, dtype):
    if dtype == torch.bfloat16 and backend == "triton" and not CUDA:
        pytest.skip("the Triton interpreter has no bf16 arithmetic (the kernels upcast it anyway)")


# ---------------------------------------------------------------- oracle (independent)
def oracle(hidden, weight, targets, token_weights, bias=None, softcap=None, ignore_index=-100, dtype=torch.float64):
    """(loss, logp [T]) from full [T, V] logits in ``dtype`` (float64: the reference)."""
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    z = h @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    t = targets.reshape(-1)
    keep = t != ignore_index
    logp = torch.log_softmax(z.float() if dtype != torch.float64 else z, dim=-1)
    logp = torch.where(keep, logp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    w = torch.where(keep, token_weights.reshape(-1).to(logp.dtype), 0.0)
    return -(w * logp).sum(), logp


def run(fn, tensors):
    """fn(*leaves) -> (loss, extra); loss, extra and the gradients of loss for leaves that require grad."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    loss, extra = fn(*leaves)
    diff = [t for t in leaves if t is not None and t.requires_grad]
    grads = list(torch.autograd.grad(loss, diff)) if diff else []
    return loss.detach(), extra.detach(), grads


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def assert_within_budget(name, got, ref, eager, dtype):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err, budget = rel_err(got, ref), max(2 * rel_err(eager, ref), FLOOR[dtype])
    assert err <= budget, f"{name}: error {err:.3e} > budget {budget:.3e} (eager {rel_err(eager, ref):.3e})"


def make_inputs(dtype, *, T=47, D=123, V=507, bias=False, layout="contiguous", ignore_every=4, seed=0,
                weights="mean"):
    """hidden, weight, bias, targets, token_weights; logits of realistic spread (std ~2).

    layout "strided": hidden a stride-2 view out of [T, 2D]; "leading": [2, T//2, D] transposed.
    weights "mean": 1/n_target on target tokens; "random": positive random, some zero.
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
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    if weights == "mean":
        mask = (targets != -100).float()
        token_weights = mask / mask.sum()
    else:
        token_weights = torch.rand(targets.shape, generator=g)
        token_weights.view(-1)[1::5] = 0.0
    move = (lambda t: None if t is None else t.to(DEVICE))
    return move(hidden), move(weight), move(b), move(targets), move(token_weights)


VARIANTS = {  # name: (make_inputs kwargs, softcap)
    "plain": (dict(ignore_every=0), None),
    "bias_strided_random_weights": (dict(bias=True, layout="strided", weights="random"), None),
    "softcap_bias_leading": (dict(bias=True, layout="leading"), 5.0),
}


# ---------------------------------------------------------------- correctness
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64(backend, dtype, variant):
    _dtype_runs(backend, dtype)
    kwargs, softcap = VARIANTS[variant]
    hidden, weight, bias, targets, token_weights = make_inputs(dtype, **kwargs)
    for t in (hidden, weight, bias):
        if t is not None:
            t.requires_grad_(True)
    inputs = (hidden, weight, bias)
    got = run(lambda h, w, b: weighted_nll(h, w, targets, token_weights, bias=b, softcap=softcap, backend=backend,
                                           return_logprobs=True), inputs)
    ref = run(lambda h, w, b: oracle(h, w, targets, token_weights, b, softcap), inputs)
    eager = run(lambda h, w, b: oracle(h, w, targets, token_weights, b, softcap, dtype=dtype), inputs)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    assert got[1].dtype == torch.float32 and got[1].shape == (targets.numel(),)
    assert torch.all(got[1][targets.reshape(-1) == -100] == 0)
    assert_within_budget("loss", got[0], ref[0], eager[0], dtype)
    assert_within_budget("logp", got[1], ref[1], eager[1], dtype)
    for name, g, r, e, leaf in zip(("d_hidden", "d_weight", "d_bias"), got[2], ref[2], eager[2],
                                   [t for t in inputs if t is not None]):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert_within_budget(name, g, r, e, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_token_logprob(backend):
    """Same loss and gradients as the any-upstream-gradient op driven by the same weights."""
    hidden, weight, bias, targets, token_weights = make_inputs(torch.float32, bias=True, weights="random", seed=2)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    inputs = (hidden, weight, bias)
    ours = run(lambda h, w, b: (weighted_nll(h, w, targets, token_weights, bias=b, softcap=3.0, backend=backend),
                                torch.zeros(())), inputs)
    theirs = run(lambda h, w, b: (-(token_weights.reshape(-1) * token_logprob(
        h, w, targets, bias=b, softcap=3.0, backend=backend)).sum(), torch.zeros(())), inputs)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(ours[2], theirs[2]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gives_no_weight_gradient(backend):
    # LoRA / frozen LM head: only hidden requires grad; dW is neither computed nor returned.
    hidden, weight, bias, targets, token_weights = make_inputs(torch.float32, bias=True, seed=3)
    hidden.requires_grad_(True)
    loss = weighted_nll(hidden, weight, targets, token_weights, bias=bias, backend=backend)
    loss.backward()
    assert weight.grad is None and bias.grad is None
    (ref_grad,) = run(lambda h: oracle(h, weight, targets, token_weights, bias), (hidden,))[2]
    assert rel_err(hidden.grad, ref_grad) <= FLOOR[torch.float32]
    # and the op was asked for dH only
    _, _, d_h, d_w, d_b = torch.ops.r3v.weighted_nll(hidden.detach(), weight, targets, token_weights, bias, -100, 0.0,
                                                     backend, True, False, False)
    assert d_h.shape == hidden.shape and d_w.numel() == 0 and d_b.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_gradients_and_token_weights_get_minus_logp(backend):
    hidden, weight, bias, targets, token_weights = make_inputs(torch.float32, bias=True, weights="random", seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias, token_weights)]
    loss, logp = weighted_nll(leaves[0], leaves[1], targets, leaves[3], bias=leaves[2], backend=backend,
                              return_logprobs=True)
    (loss * -2.5).backward()
    ref = [t.clone().requires_grad_(True) for t in (hidden, weight, bias, token_weights)]
    ref_loss, _ = oracle(ref[0], ref[1], targets, ref[3], ref[2])
    (ref_loss * -2.5).backward()
    for name, got, expected in zip(("d_hidden", "d_weight", "d_bias", "d_token_weights"), leaves, ref):
        assert rel_err(got.grad, expected.grad) <= FLOOR[torch.float32], name
    torch.testing.assert_close(leaves[3].grad, 2.5 * logp, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_zero_weights_and_empty(backend):
    hidden, weight, bias, targets, _ = make_inputs(torch.float32, T=20, bias=True)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    ignored = torch.full_like(targets, -100)
    nan_weights = torch.full(targets.shape, float("nan"), device=DEVICE)  # ignored tokens weigh 0 whatever
    loss, logp = weighted_nll(hidden, weight, ignored, nan_weights, bias=bias, backend=backend, return_logprobs=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp, torch.zeros(20, device=DEVICE))
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))
        t.grad = None
    # zero weights on valid targets: loss 0, gradients 0, but logp is still computed
    zero = torch.zeros(targets.shape, device=DEVICE)
    valid_targets = targets.clamp(min=0)
    loss, logp = weighted_nll(hidden, weight, valid_targets, zero, bias=bias, backend=backend, return_logprobs=True)
    loss.backward()
    assert loss.item() == 0.0 and (logp < 0).all()
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))
    empty = weighted_nll(hidden[:0], weight, targets[:0], zero[:0], backend=backend)
    assert empty.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_hidden_at_ignored_positions_counts_nowhere(backend):
    hidden, weight, _, targets, token_weights = make_inputs(torch.float32, seed=5)
    poisoned = hidden.clone()
    poisoned[targets == -100] = float("inf")
    grads = []
    for h in (hidden, poisoned):
        leaves = [h.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
        loss = weighted_nll(leaves[0], leaves[1], targets, token_weights, backend=backend)
        loss.backward()
        grads.append((loss, leaves[0].grad[targets != -100], leaves[1].grad))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sums_of_logprobs(backend):
    hidden, weight, bias, targets, token_weights = make_inputs(torch.float32, bias=True, seed=6)
    g = torch.Generator().manual_seed(7)
    segment_ids = torch.tensor([0, 2, 3, -1, 9])[torch.randint(0, 5, (targets.numel(),), generator=g)].to(DEVICE)
    loss, sums = weighted_nll(hidden, weight, targets, token_weights, bias=bias, backend=backend,
                              return_logprobs=True, segment_ids=segment_ids, num_segments=4)
    _, ref_logp = oracle(hidden, weight, targets, token_weights, bias)
    expected = torch.stack([ref_logp[segment_ids == s].sum() for s in range(4)])
    assert sums.shape == (4,) and sums[1].item() == 0.0
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-5)
    assert not sums.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend):
    hidden, weight, bias, targets, token_weights = make_inputs(torch.float32, bias=True, seed=8, weights="random")

    def once():
        return run(lambda h, w, b: weighted_nll(h, w, targets, token_weights, bias=b, softcap=4.0, backend=backend,
                                                return_logprobs=True),
                   (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))

    (l1, p1, g1), (l2, p2, g2) = once(), once()
    assert torch.equal(l1, l2) and torch.equal(p1, p2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---------------------------------------------------------------- peaked distributions
def _peaked(T, V, seed=0):
    """Random logits (std 2) plus a float64-computed boost of each target to p in [0.99, 0.999]."""
    g = torch.Generator().manual_seed(seed)
    d0 = 32
    hidden = torch.zeros(T, d0 + T, dtype=torch.float64)
    weight = torch.zeros(V, d0 + T, dtype=torch.float64)
    hidden[:, :d0] = torch.randn(T, d0, generator=g, dtype=torch.float64)
    weight[:, :d0] = torch.randn(V, d0, generator=g, dtype=torch.float64) * 2 / d0 ** 0.5
    targets = torch.randperm(V, generator=g)[:T]
    base = hidden @ weight.T
    rest = base.clone()
    rest[torch.arange(T), targets] = float("-inf")
    p = 0.99 + 0.009 * torch.rand(T, generator=g, dtype=torch.float64)
    hidden[torch.arange(T), d0 + torch.arange(T)] = (torch.log(p / (1 - p)) + torch.logsumexp(rest, 1)
                                                     - base[torch.arange(T), targets])
    weight[targets, d0 + torch.arange(T)] = 1.0
    return hidden.float().to(DEVICE), weight.float().to(DEVICE), targets.to(DEVICE)


@pytest.mark.parametrize("V", [32_000, 151_936])
@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_logits_per_token_error(backend, V, monkeypatch):
    if backend == "triton" and INTERPRET:  # wider vocabulary steps keep the interpreter at seconds
        kernels = importlib.import_module("r3v_fast.kernels.weighted_nll")
        monkeypatch.setattr(kernels, "default_config",
                            lambda dtype: dataclasses.replace(kernels.INTERPRETER_CONFIG, block_v=2048))
    hidden, weight, targets = _peaked(8, V)
    token_weights = torch.full((8,), 1 / 8, device=DEVICE)
    hidden.requires_grad_(True)
    loss, logp = weighted_nll(hidden, weight, targets, token_weights, backend=backend, return_logprobs=True)
    loss.backward()
    _, ref, (ref_grad,) = run(lambda h: oracle(h, weight, targets, token_weights), (hidden,))
    assert ref.exp().min() > 0.99
    _, eager_logp, eager_grads = run(lambda h: oracle(h, weight, targets, token_weights, dtype=torch.float32),
                                         (hidden,))
    err, bound = (logp.double() - ref).abs(), 2 * (eager_logp.double() - ref).abs().max() + FLOOR[torch.float32]
    assert err.max() <= bound, f"per-token error {err.tolist()} > bound {bound:.3e}"
    assert_within_budget("d_hidden", hidden.grad, ref_grad, eager_grads[0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dominant_logit(backend, monkeypatch):
    """Logit 20 at one place among V = 151,936 zeros: NLL = log1p((V-1)·e^-20) = 3.1311e-4 (issue 16)."""
    if backend == "triton" and INTERPRET:
        kernels = importlib.import_module("r3v_fast.kernels.weighted_nll")
        monkeypatch.setattr(kernels, "default_config",
                            lambda dtype: dataclasses.replace(kernels.INTERPRETER_CONFIG, block_v=2048))
    V = 151_936
    places = [0, V // 2, V - 1]
    hidden = torch.eye(3, device=DEVICE)  # [3, 3]: token k sees logit 20 at places[k]
    weight = torch.zeros(V, 3, device=DEVICE)
    weight[places, [0, 1, 2]] = 20.0
    targets = torch.tensor(places, device=DEVICE)
    exact = math.log1p((V - 1) * math.exp(-20.0))
    loss, logp = weighted_nll(hidden, weight, targets, torch.ones(3, device=DEVICE), backend=backend,
                              return_logprobs=True)
    for k in range(3):
        assert abs(-logp[k].item() - exact) <= 2e-7 + 1e-3 * exact, f"dominant logit at {places[k]}: {logp[k]}"
    assert abs(loss.item() - 3 * exact) <= 3 * (2e-7 + 1e-3 * exact)


# ---------------------------------------------------------------- triton chunking, 16-bit target logit
@pytest.mark.parametrize("chunk_tokens", [1, 16, 64], ids=["one_row", "three_chunks", "one_chunk"])
@pytest.mark.parametrize("backend", [TRITON])
def test_triton_chunk_sizes(backend, chunk_tokens, monkeypatch):
    kernels = importlib.import_module("r3v_fast.kernels.weighted_nll")
    base = kernels.default_config
    monkeypatch.setattr(kernels, "default_config",
                        lambda dtype: dataclasses.replace(base(dtype), chunk_tokens=chunk_tokens))
    hidden, weight, bias, targets, token_weights = make_inputs(torch.float32, bias=True, weights="random", seed=9)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    inputs = (hidden, weight, bias)
    got = run(lambda h, w, b: weighted_nll(h, w, targets, token_weights, bias=b, softcap=4.0, backend=backend,
                                           return_logprobs=True), inputs)
    ref = run(lambda h, w, b: oracle(h, w, targets, token_weights, b, 4.0), inputs)
    eager = run(lambda h, w, b: oracle(h, w, targets, token_weights, b, 4.0, dtype=torch.float32), inputs)
    assert_within_budget("loss", got[0], ref[0], eager[0], torch.float32)
    for name, g, r, e in zip(("d_hidden", "d_weight", "d_bias"), got[2], ref[2], eager[2]):
        assert_within_budget(name, g, r, e, torch.float32)


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_16bit_target_logit_is_exact(backend):
    """fp16 logits round a logit of ~20 by up to 0.008; the target's is recomputed in fp32."""
    hidden, weight, targets = _peaked(8, 4096, seed=1)
    dtype = torch.float16
    _, ref = oracle(hidden.to(dtype), weight.to(dtype), targets, torch.ones(8, device=DEVICE))
    _, logp = weighted_nll(hidden.to(dtype), weight.to(dtype), targets, torch.ones(8, device=DEVICE),
                           backend=backend, return_logprobs=True)
    _, eager = oracle(hidden.to(dtype), weight.to(dtype), targets, torch.ones(8, device=DEVICE), dtype=dtype)
    err, eager_err = (logp.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
    assert err < eager_err / 4, f"fp16: error {err:.2e} vs eager {eager_err:.2e}"


# ---------------------------------------------------------------- registration, compile
def _tiny(seed=7, T=9, D=20, V=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.3).to(DEVICE).requires_grad_()
    bias = torch.randn(V, generator=g).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g).to(DEVICE)
    targets[2] = -100
    token_weights = torch.rand(T, generator=g).to(DEVICE)
    return hidden, weight, bias, targets, token_weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, bias, targets, token_weights = _tiny()
    op = torch.ops.r3v.weighted_nll.default
    torch.library.opcheck(op, (hidden, weight, targets, token_weights, bias, -100, 0.0, backend, True, True, True))
    torch.library.opcheck(op, (hidden, weight.detach(), targets, token_weights, None, -100, 3.0, backend, True, False,
                               False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """fullgraph through the registered ops (aot_eager on the CPU: Inductor's C++ build is slow here)."""
    hidden, weight, bias, targets, token_weights = _tiny()

    def loss(h, w, b):
        value, logp = weighted_nll(h, w, targets, token_weights, bias=b, softcap=2.0, backend=backend,
                                   return_logprobs=True)
        return value * 3.0, logp

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
    out = run(compiled, (hidden, weight, bias))
    ref = run(loss, (hidden, weight, bias))
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=1e-6)
    for g, r in zip(out[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_second_backward_through_retained_graph_raises():
    # The backward scales the stored gradients in place: a second pass must fail loudly.
    hidden, weight, bias, targets, token_weights = _tiny()
    loss = weighted_nll(hidden, weight, targets, token_weights, bias=bias, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_allocates_no_gradient_sized_tensor(backend):
    """The backward hands the forward's dH / dW to autograd: no copy, no zero-filled stand-in
    for the outputs that have no gradient (which autograd would otherwise materialize)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, weight, _, targets, token_weights = _tiny(T=12, D=24, V=50)
    big = {hidden.numel(), weight.numel()}

    class Allocations(TorchDispatchMode):
        sizes: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() in big:
                    self.sizes.append((str(func), t.data_ptr()))
            return out

    outputs = torch.ops.r3v.weighted_nll(hidden, weight, targets, token_weights, None, -100, 0.0, backend,
                                         True, True, False)
    loss, pointers = outputs[0], (outputs[2].data_ptr(), outputs[3].data_ptr())
    del outputs
    with Allocations() as mode:
        (loss * 0.5).backward()
    # gradient-sized results (the in-place scaling, detach views) all live in the forward's buffers
    assert mode.sizes and all(ptr in pointers for _, ptr in mode.sizes), mode.sizes
    assert (hidden.grad.data_ptr(), weight.grad.data_ptr()) == pointers


# ---------------------------------------------------------------- backend choice, bad input
def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("R3V_BACKEND", raising=False)
    assert backends.resolve_backend("auto", cpu) == ("cpp" if seg_backends.cpp_available() else "torch")
    monkeypatch.setenv("R3V_BACKEND", "torch")
    assert backends.resolve_backend("auto", cpu) == "torch"
    monkeypatch.delenv("R3V_BACKEND")
    with pytest.raises(RuntimeError, match="weighted_nll: backend='cpp' runs on CPU tensors only"):
        backends.resolve_backend("cpp", torch.device("cuda"))


def test_bad_inputs_raise_clear_errors():
    hidden, weight, _, targets, token_weights = (t.cpu() if t is not None else None
                                                 for t in make_inputs(torch.float32, T=8, D=16, V=32))
    cases = [
        (lambda: weighted_nll(hidden[:, :15], weight, targets, token_weights), "weighted_nll: hidden last dim 15"),
        (lambda: weighted_nll(hidden, weight, targets, token_weights[:5]), "token_weights must be a floating"),
        (lambda: weighted_nll(hidden, weight, targets, targets), "token_weights must be a floating"),
        (lambda: weighted_nll(hidden, weight, targets.index_fill(0, torch.tensor([5]), 40), token_weights),
         r"weighted_nll: targets\[5\] = 40 is outside the vocabulary"),
        (lambda: weighted_nll(hidden, weight, targets, token_weights, segment_ids=targets, num_segments=2),
         "pass return_logprobs=True"),
        (lambda: weighted_nll(hidden, weight, targets, token_weights, return_logprobs=True, segment_ids=targets),
         "num_segments must be an int"),
        (lambda: weighted_nll(hidden, weight, targets, token_weights, softcap=-1.0), "softcap must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------- GPU only
@needs_cuda
def test_cuda_forward_backward_do_not_sync():
    hidden, weight, bias, targets, token_weights = make_inputs(torch.bfloat16, bias=True)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    weighted_nll(hidden, weight, targets, token_weights, bias=bias).backward()  # warm-up: Triton compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = weighted_nll(hidden, weight, targets, token_weights, bias=bias, backend="triton",
                               return_logprobs=True)
        (loss * 2).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_bf16_many_chunks_match_float64():
    """T = 4096 over 8 chunks of 512: dW is rounded to bf16 once per chunk."""
    hidden, weight, _, targets, token_weights = make_inputs(torch.bfloat16, T=4096, D=256, V=8192, seed=11)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    got = run(lambda h, w: (weighted_nll(h, w, targets, token_weights), torch.zeros(())), (hidden, weight))
    ref = run(lambda h, w: oracle(h, w, targets, token_weights), (hidden, weight))
    eager = run(lambda h, w: oracle(h, w, targets, token_weights, dtype=torch.bfloat16), (hidden, weight))
    assert_within_budget("loss", got[0], ref[0], eager[0], torch.bfloat16)
    for name, g, r, e in zip(("d_hidden", "d_weight"), got[2], ref[2], eager[2]):
        assert_within_budget(name, g, r, e, torch.bfloat16)
