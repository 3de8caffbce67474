"""Tests for r3v_fast.reference.segment_logprob (the chunked "torch" backend), called directly.

Against float64 full logits written out here; the chunk size is forced down to a few rows
(and to one row) so that chunk boundaries fall everywhere, including mid-batch.
"""

import pytest
import torch

from r3v_fast.reference import segment_logprob as reference


def _inputs(T=23, D=17, V=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / 2
    bias = torch.randn(V, generator=g)
    targets = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, bias, targets


def _float64_oracle(hidden, weight, bias, targets, softcap, grad_logp):
    h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
    z = h @ w.T + b
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1).gather(1, targets[:, None])[:, 0]
    logp.backward(grad_logp.double())
    return logp.detach(), torch.logsumexp(z, -1).detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("chunk_elements", [1, 3 * 61, 1 << 22], ids=["one_row", "three_rows", "one_chunk"])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_forward_backward_match_float64(chunk_elements, softcap):
    hidden, weight, bias, targets = _inputs()
    grad_logp = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1))
    logp, lse = reference.token_logprob_fwd(hidden, weight, bias, targets, softcap, chunk_elements=chunk_elements)
    grads = reference.token_logprob_bwd(hidden, weight, bias, targets, lse, grad_logp, softcap, True, True, True,
                                        chunk_elements=chunk_elements)
    expected = _float64_oracle(hidden, weight, bias, targets, softcap, grad_logp)
    for name, got, ref in zip(("logp", "lse", "d_hidden", "d_weight", "d_bias"), (logp, lse, *grads), expected):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


def test_backward_skips_gradients_not_asked_for():
    hidden, weight, bias, targets = _inputs()
    _, lse = reference.token_logprob_fwd(hidden, weight, bias, targets, 0.0)
    grad = torch.ones(hidden.shape[0])
    assert reference.token_logprob_bwd(hidden, weight, bias, targets, lse, grad, 0.0, False, False, False) == (
        None, None, None)
    d_h, d_w, d_b = reference.token_logprob_bwd(hidden, weight, None, targets, lse, grad, 0.0, False, True, True)
    assert d_h is None and d_w.shape == weight.shape and d_b is None  # no bias, no bias gradient


def test_segment_sum_drops_out_of_range_ids_and_keeps_empty_segments_zero():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    ids = torch.tensor([3, -1, 0, 3, 5, 0])
    assert reference.segment_sum(values, ids, 5).tolist() == [36.0, 0.0, 0.0, 9.0, 0.0]
    assert reference.segment_sum(values, ids, 0).shape == (0,)
