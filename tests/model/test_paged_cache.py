"""PagedPrefixCache + "r3v_prefix" attention inside real tiny HF models (Qwen2-VL, LLaVA; fp32).

Oracle: a plain forward of each full token sequence (prompt + branch tokens) through the
unmodified model with its default attention and positions, one sequence at a time, no cache.
The cache is driven by hand, as the continuous-batching sampler drives it: two right-padded
prompts prefilled into shuffled blocks; branches decoded one forced token at a time in decode
slots, with a branch moving to another slot, a branch joining late and an empty slot in the
batch; then branches that start with several tokens from a shorter part of the prefix (the
select-prompt shape). Every logit row must match the oracle's row for the same token.
"""

import pytest
import torch

from r3v_fast.model.loading import lm_head_and_backbone, load_vlm
from r3v_fast.model.paged_cache import SCRATCH_BLOCK, PagedPrefixCache
from r3v_fast.model.prefix_cache import prefix_attention_enabled

PROMPTS = [[11, 40, 41, 42, 43, 44, 45], [12, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59]]
BRANCHES = [[[60, 61, 62, 63, 64, 65], [70, 71, 72, 73, 74, 75]],
            [[90, 91, 92, 93, 94, 95], [100, 101, 102, 103, 104, 105]]]
BLOCK = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["qwen2vl", "llava"])
def model(request):
    model, _ = load_vlm(request.getfixturevalue(f"tiny_{request.param}_dir"))
    return model


def _positions(model, positions):
    """[R, L] text positions -> the model's position_ids (3 equal rows for M-RoPE)."""
    return positions.unsqueeze(0).expand(3, -1, -1) if hasattr(model.model, "get_rope_index") else positions


@torch.no_grad()
def _reference_logits(model, ids):
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _cache(model, num_blocks=40):
    text = model.config.get_text_config()
    return PagedPrefixCache(text.num_hidden_layers, num_blocks=num_blocks, block_size=BLOCK,
                            num_kv_heads=text.num_key_value_heads,
                            head_dim=text.hidden_size // text.num_attention_heads, dtype=torch.float32,
                            device="cpu", max_slots=5, max_rows=3, max_width=3, slot_blocks=4, prefix_blocks=3,
                            backend="torch")


def _destinations(tables, lengths, width):
    """(blocks, offsets) of token j of row i (flattened [rows * width]); scratch past a length."""
    blocks, offsets = [], []
    for table, length in zip(tables, lengths):
        for j in range(width):
            blocks.append(table[j // BLOCK] if j < length else SCRATCH_BLOCK)
            offsets.append(j % BLOCK)
    return torch.tensor(blocks), torch.tensor(offsets)


@torch.no_grad()
def test_prefill_decode_in_slots_and_extend_match_plain_forward(model):
    lm_head, backbone = lm_head_and_backbone(model)
    cache = _cache(model)
    free = torch.randperm(cache.num_blocks - 1, generator=torch.Generator().manual_seed(0)).add(1).tolist()
    take = lambda n: [free.pop() for _ in range(n)]  # noqa: E731

    def run(input_ids, positions, attend=True):
        extra = {"r3v_prefix": cache} if attend else {}
        hidden = backbone(input_ids=input_ids, position_ids=_positions(model, positions),
                          past_key_values=cache, use_cache=True, **extra)
        return lm_head(hidden)

    with prefix_attention_enabled(model):
        # Prefill: two prompts of different lengths, right-padded, into shuffled blocks.
        lens = [len(p) for p in PROMPTS]
        p_max = max(lens)
        prefix_tables = [take(3), take(3)]
        cache.begin_prefill(*_destinations(prefix_tables, lens, p_max))
        logits = run(torch.tensor([p + [0] * (p_max - len(p)) for p in PROMPTS]),
                     torch.arange(p_max).expand(2, p_max), attend=False)
        cache.end_forward()
        for q, prompt in enumerate(PROMPTS):
            _close(logits[q, :len(prompt)], _reference_logits(model, prompt))

        # Decode. branch (q, b) -> slot per step; branch (1, 1) joins at step 2 in slot 4 and
        # moves to slot 0 at step 3, when branch (0, 0) moves from slot 0 to slot 3; every step
        # has an empty slot (scratch).
        tables = {(q, b): take(2) for q in range(2) for b in range(2)}
        cache.prefix_tables[:2, :3] = torch.tensor(prefix_tables)
        cache.prefix_lens[:2] = torch.tensor(lens)
        done = {key: 0 for key in tables}                      # tokens of each branch in the cache
        for step in range(6):
            layout = {(0, 0): 0 if step < 3 else 3, (0, 1): 1, (1, 0): 2}
            if step >= 2:
                layout[(1, 1)] = 0 if step >= 3 else 4
            slots = 5
            cache.slot_tables.zero_()
            cache.slot_lens.zero_()
            cache.slot_live.zero_()
            cache.question_slots.fill_(-1)
            tokens, positions = [0] * slots, [0] * slots
            for (q, b), s in layout.items():
                cache.slot_tables[s, :2] = torch.tensor(tables[(q, b)])
                cache.slot_lens[s] = done[(q, b)]
                cache.slot_live[s] = 1
                column = (cache.question_slots[q] < 0).nonzero()[0, 0]
                cache.question_slots[q, column] = s
                tokens[s] = BRANCHES[q][b][done[(q, b)]]
                positions[s] = lens[q] + done[(q, b)]
            cache.begin_decode(slots)
            logits = run(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None])
            cache.end_decode()
            for (q, b), s in layout.items():
                done[(q, b)] += 1
                full = PROMPTS[q] + BRANCHES[q][b][:done[(q, b)]]
                _close(logits[s, -1], _reference_logits(model, full)[-1])
            for s in set(range(slots)) - set(layout.values()):   # empty slots stay empty
                assert cache.slot_lens[s] == 0

        # Extend: rows read the first C tokens of a prefix and start with several tokens.
        shared = [5, 9]
        starts = [[20, 21, 22, 23], [26, 27]]
        width = max(len(t) for t in starts)
        branch_tables = [take(2), take(2)]
        blocks, offsets = _destinations(branch_tables, [len(t) for t in starts], width)
        cache.begin_extend(blocks, offsets, torch.tensor(prefix_tables), torch.tensor(shared),
                           torch.tensor([len(t) for t in starts]))
        ids = torch.tensor([t + [0] * (width - len(t)) for t in starts])
        positions = torch.tensor(shared)[:, None] + torch.arange(width)
        logits = run(ids, positions)
        cache.end_forward()
        for q in range(2):
            full = PROMPTS[q][:shared[q]] + starts[q]
            _close(logits[q, :len(starts[q])], _reference_logits(model, full)[shared[q]:])

        # One decode step of the extended branches, each reading C prefix tokens.
        cache.slot_tables.zero_()
        cache.question_slots.fill_(-1)
        cache.prefix_lens[:2] = torch.tensor(shared)
        for q in range(2):
            cache.slot_tables[q, :2] = torch.tensor(branch_tables[q])
            cache.slot_lens[q] = len(starts[q])
            cache.question_slots[q, 0] = q
        cache.slot_live[:2] = 1
        cache.set_view(rows=2, prefix_blocks=3, slot_blocks=2)
        cache.begin_decode(2)
        next_tokens = [30, 31]
        logits = run(torch.tensor(next_tokens)[:, None],
                     (torch.tensor(shared) + torch.tensor([len(t) for t in starts]))[:, None])
        cache.end_decode()
        for q in range(2):
            full = PROMPTS[q][:shared[q]] + starts[q] + [next_tokens[q]]
            _close(logits[q, -1], _reference_logits(model, full)[-1])
        assert cache.slot_lens[:2].tolist() == [len(starts[0]) + 1, len(starts[1]) + 1]


def test_pool_bytes_and_clear_errors():
    cache = PagedPrefixCache(3, num_blocks=10, block_size=8, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                             device="cpu", max_slots=4, max_rows=2, max_width=2, slot_blocks=3, prefix_blocks=5)
    assert cache.nbytes() == 3 * 2 * 10 * 2 * 8 * 16 * 4          # layers x (K, V) x pool
    assert cache.block_bytes() == 3 * 2 * 2 * 8 * 16 * 4
    with pytest.raises(RuntimeError, match="no mode set"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        PagedPrefixCache(1, num_blocks=1, block_size=8, num_kv_heads=1, head_dim=8, dtype=torch.float32,
                         device="cpu", max_slots=1, max_rows=1, max_width=1, slot_blocks=1, prefix_blocks=1)
