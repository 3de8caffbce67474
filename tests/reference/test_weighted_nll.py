"""Tests for r3v_fast.reference.weighted_nll (the chunked "torch" backend), called directly.

Against float64 full logits written out here; the chunk size is forced down to a few rows
(and to one row) so that chunk boundaries fall everywhere, with the dW accumulation crossing
them. 16-bit inputs: the result must stay within the budget of docs/architecture.md, "Tests"
(2x the eager PyTorch error, floors fp16 1e-3, bf16 1e-2).
"""

import pytest
import torch

from r3v_fast.reference import weighted_nll as reference


def _inputs(T=23, D=17, V=61, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / 2).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    token_weights = torch.rand(T, generator=g)
    token_weights[::4] = 0.0  # weight-0 rows contribute nothing
    return hidden, weight, bias, targets, token_weights


def _oracle(hidden, weight, bias, targets, token_weights, softcap, dtype=torch.float64):
    h, w, b = (t.to(dtype).requires_grad_() for t in (hidden, weight, bias))
    z = h @ w.T + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z.double() if dtype == torch.float64 else z.float(), -1).gather(1, targets[:, None])[:, 0]
    loss = -(token_weights.to(logp.dtype) * logp).sum()
    loss.backward()
    return logp.detach(), h.grad, w.grad, b.grad


def _rel(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("chunk_elements", [1, 3 * 61, 1 << 22], ids=["one_row", "three_rows", "one_chunk"])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_matches_float64(chunk_elements, softcap):
    hidden, weight, bias, targets, token_weights = _inputs()
    got = reference.weighted_nll_fwd(hidden, weight, bias, targets, token_weights, softcap, True, True, True,
                                     chunk_elements=chunk_elements)
    expected = _oracle(hidden, weight, bias, targets, token_weights, softcap)
    for name, g, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, expected):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_inputs_many_chunks_within_eager_budget(dtype):
    # 8-row chunks: dW crosses 12 chunk boundaries, accumulated in fp32 (not rounded per chunk).
    hidden, weight, bias, targets, token_weights = _inputs(T=96, D=40, V=300, seed=1, dtype=dtype)
    got = reference.weighted_nll_fwd(hidden, weight, bias, targets, token_weights, 0.0, True, True, True,
                                     chunk_elements=8 * 300)
    ref = _oracle(hidden, weight, bias, targets, token_weights, 0.0)
    eager = _oracle(hidden, weight, bias, targets, token_weights, 0.0, dtype=dtype)
    floor = {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    for name, g, r, e, like in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, ref, eager,
                                   (None, hidden, weight, bias)):
        if like is not None:
            assert g.dtype == like.dtype, name
        assert _rel(g, r) <= max(2 * _rel(e, r), floor), f"{name}: {_rel(g, r):.2e} vs eager {_rel(e, r):.2e}"


def test_skips_gradients_not_asked_for():
    hidden, weight, bias, targets, token_weights = _inputs()
    logp, d_h, d_w, d_b = reference.weighted_nll_fwd(hidden, weight, bias, targets, token_weights, 0.0,
                                                     False, False, False)
    assert logp.shape == (23,) and d_h is None and d_w is None and d_b is None
    _, d_h, d_w, d_b = reference.weighted_nll_fwd(hidden, weight, None, targets, token_weights, 0.0,
                                                  True, False, True)
    assert d_h.shape == hidden.shape and d_w is None and d_b is None  # no bias, no bias gradient


def test_weight_zero_rows_have_zero_gradient_rows():
    hidden, weight, bias, targets, token_weights = _inputs(seed=2)
    _, d_h, _, _ = reference.weighted_nll_fwd(hidden, weight, bias, targets, token_weights, 0.0, True, False, False)
    assert torch.equal(d_h[token_weights == 0], torch.zeros_like(d_h[token_weights == 0]))
