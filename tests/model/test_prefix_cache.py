"""SharedPrefixCache + "r3v_prefix" attention inside real tiny HF models (Qwen2-VL, LLaVA; fp32).

Oracle: a plain forward of each full token sequence (prompt + branch tokens) through the
unmodified model with its default attention and positions, one sequence at a time, no cache.
The cache is driven by hand here (prefill of two right-padded prompts of different lengths,
K branches decoded one forced token at a time with capacity growth and a reordering
``select``, then branches that start with several tokens from a shorter shared prefix), and
every logit row must match the oracle's row for the same token.
"""

import pytest
import torch

from r3v_fast.model.loading import lm_head_and_backbone, load_vlm
from r3v_fast.model.prefix_cache import (ATTENTION_NAME, SharedPrefixCache, prefix_attention_enabled,
                                         prefix_attention_forward)

PROMPTS = [[11, 40, 41, 42, 43, 44, 45], [12, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59]]
BRANCHES = [[[60, 61, 62, 63, 64], [70, 71, 72], [80, 81, 82, 83, 84, 85]],
            [[90, 91], [100, 101, 102, 103, 104, 105], [110, 111, 112, 113]]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is plenty, and on a busy shared machine it avoids
    OpenMP threads spinning against each other (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["qwen2vl", "llava"])
def model(request):
    model, _ = load_vlm(request.getfixturevalue(f"tiny_{request.param}_dir"))
    return model


def _is_mrope(model) -> bool:
    return hasattr(model.model, "get_rope_index")


def _positions(model, positions):
    """[R, L] text positions -> the model's position_ids (3 equal rows for M-RoPE)."""
    return positions.unsqueeze(0).expand(3, -1, -1) if _is_mrope(model) else positions


@torch.no_grad()
def _reference_logits(model, ids):
    """Plain forward of one sequence, default attention and positions, no cache: [L, V]."""
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prefill_decode_select_and_extend_match_plain_forward(model):
    lm_head, backbone = lm_head_and_backbone(model)
    num_layers = model.config.get_text_config().num_hidden_layers
    cache = SharedPrefixCache(num_layers, backend="torch")
    lens = torch.tensor([len(p) for p in PROMPTS])
    p_max = int(lens.max())
    padded = torch.tensor([p + [0] * (p_max - len(p)) for p in PROMPTS])    # right padding

    def run(input_ids, positions):
        hidden = backbone(input_ids=input_ids, position_ids=_positions(model, positions),
                          past_key_values=cache, use_cache=True, r3v_prefix=cache)
        return lm_head(hidden)

    with prefix_attention_enabled(model):
        cache.begin_prefill()
        logits = run(padded, torch.arange(p_max).expand(2, p_max))
        for q, prompt in enumerate(PROMPTS):
            _close(logits[q, :len(prompt)], _reference_logits(model, prompt))

        # K = 3 branches per question, one forced token per step; capacity starts at 2.
        cache.begin_branches(torch.arange(2), lens, 3, capacity=2)
        rows = torch.arange(2)[:, None].expand(2, 3)          # question of each layout slot
        cols = torch.arange(3)[None, :].expand(2, 3)          # branch of each layout slot
        for step in range(6):
            if step == 2:   # reorder questions, drop a branch: layout [[q1: b2, b1], [q0: b0, b2]]
                questions, keep = torch.tensor([1, 0]), torch.tensor([[2, 1], [0, 2]])
                cache.select(questions, keep)
                rows, cols = rows[questions[:, None], keep], cols[questions[:, None], keep]
            cache.ensure_capacity(step + 1)
            cache.begin_decode()
            tokens = torch.tensor([[BRANCHES[q][b][step] if step < len(BRANCHES[q][b]) else 0
                                    for q, b in zip(r.tolist(), c.tolist())] for r, c in zip(rows, cols)])
            positions = lens[rows[:, 0]][:, None] + cache.suffix_lens                # [Q, K]
            logits = run(tokens.reshape(-1, 1), positions.reshape(-1, 1)).view(*rows.shape, -1)
            cache.end_decode()
            for i in range(rows.shape[0]):
                for j in range(rows.shape[1]):
                    q, b = int(rows[i, j]), int(cols[i, j])
                    if step < len(BRANCHES[q][b]):
                        full = PROMPTS[q] + BRANCHES[q][b][:step + 1]
                        _close(logits[i, j], _reference_logits(model, full)[-1])
        assert cache.capacity >= 6 and cache.suffix_lens.tolist() == [[6, 6], [6, 6]]
        cache.end_branches()

        # New branches that read only the first C tokens of the prefix and start with several
        # tokens of their own (the select-prompt shape), then one decode step.
        shared = torch.tensor([5, 9])
        starts = [[[20, 21, 22, 23], [24, 25]], [[26, 27, 28], [29]]]
        new_lens = torch.tensor([[len(t) for t in per_q] for per_q in starts])
        cache.begin_branches(torch.arange(2), shared, 2, capacity=4)
        width = int(new_lens.max())
        ids = torch.tensor([t + [0] * (width - len(t)) for per_q in starts for t in per_q])   # [4, S]
        positions = (shared[:, None, None] + torch.arange(width)).expand(2, 2, width).reshape(4, width)
        cache.begin_extend(0, 2, new_lens)
        logits = run(ids, positions).view(2, 2, width, -1)
        for q in range(2):
            for b in range(2):
                full = PROMPTS[q][:int(shared[q])] + starts[q][b]
                _close(logits[q, b, :len(starts[q][b])], _reference_logits(model, full)[int(shared[q]):])
        cache.ensure_capacity(width + 1)
        cache.begin_decode()
        next_tokens = torch.tensor([[30, 31], [32, 33]])
        logits = run(next_tokens.reshape(-1, 1), (shared[:, None] + cache.suffix_lens).reshape(-1, 1))
        cache.end_decode()
        for q in range(2):
            for b in range(2):
                full = PROMPTS[q][:int(shared[q])] + starts[q][b] + [int(next_tokens[q, b])]
                _close(logits[q * 2 + b, -1], _reference_logits(model, full)[-1])


@torch.no_grad()
def test_kv_bytes_are_one_prefix_plus_branches(model):
    """Held KV = layers x (K, V) x (N prefixes x P_max + Q x K x S_cap) x Hkv x Dh x 4 bytes."""
    _, backbone = lm_head_and_backbone(model)
    text = model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    cache = SharedPrefixCache(text.num_hidden_layers, backend="torch")
    with prefix_attention_enabled(model):
        cache.begin_prefill()
        ids = torch.tensor([PROMPTS[1], PROMPTS[1][::-1]])
        backbone(input_ids=ids, position_ids=_positions(model, torch.arange(11).expand(2, 11)),
                 past_key_values=cache, use_cache=True, r3v_prefix=cache)
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4
    assert cache.nbytes() == per_token * 2 * 11
    cache.begin_branches(torch.arange(2), torch.tensor([11, 11]), 8, capacity=5)
    assert cache.nbytes() == per_token * (2 * 11 + 2 * 8 * 5)
    cache.ensure_capacity(7)                   # doubles: 10
    assert cache.capacity == 10 and cache.nbytes() == per_token * (2 * 11 + 2 * 8 * 10)
    cache.select(torch.tensor([1]), torch.tensor([[3, 4]]))
    assert cache.nbytes() == per_token * (2 * 11 + 1 * 2 * 10)
    assert cache.peak_bytes == per_token * (2 * 11 + 2 * 8 * 10)
    cache.end_branches()
    assert cache.nbytes() == per_token * 2 * 11


@torch.no_grad()
def test_without_cache_keyword_it_is_plain_sdpa_and_is_restored(model):
    ids = torch.tensor([PROMPTS[1]])
    expected = model(input_ids=ids).logits
    before = model.config.get_text_config()._attn_implementation
    with prefix_attention_enabled(model):
        assert model.config.get_text_config()._attn_implementation == ATTENTION_NAME
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert model.config.get_text_config()._attn_implementation == before
    torch.testing.assert_close(generated, model.generate(input_ids=ids, max_new_tokens=4, do_sample=False))


def test_clear_errors_for_out_of_order_use():
    cache = SharedPrefixCache(2)
    with pytest.raises(RuntimeError, match="no prefix yet"):
        cache.begin_branches(torch.arange(1), torch.tensor([3]), 2)
    with pytest.raises(RuntimeError, match="begin_branches before begin_decode"):
        cache.begin_decode()
    with pytest.raises(RuntimeError, match="no mode set"):
        cache.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 0)

    class Module:
        layer_idx, is_causal = 0, True

    with pytest.raises(NotImplementedError, match="sliding-window"):
        prefix_attention_forward(Module(), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4),
                                 torch.zeros(1, 1, 1, 4), None, r3v_prefix=cache, sliding_window=4)
