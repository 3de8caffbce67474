"""Packing: padded rows ("none") and token tries ("tree") on synthetic token sequences.

Oracles are independent of the packer: a trie holds exactly the distinct non-empty prefixes of
its sequences, and in a correct tree batch the state that predicts an example's last target
token attends to exactly the slots of that example's tokens, in order, at positions 0..L-2.
"""

import random

import pytest
import torch

from r3v_fast.engine.examples import TokenizedExample
from r3v_fast.engine.packing import pack


def example(tokens, group, index, n_target=3, task="sft", image_spans=(), image_inputs=None, rope=None):
    return TokenizedExample(input_ids=torch.tensor(tokens, dtype=torch.long), n_target=n_target,
                            task=task, group=group, index=index, question_id=group,
                            image=f"{group}.png" if image_spans else "", image_inputs=image_inputs or {},
                            image_spans=tuple(image_spans), rope_positions=rope)


def r3v_group(rng, group, first_index, prefix_len=20):
    """SFT, refine, two selects (sharing more than the question), an identical copy of the SFT
    example, and an example that is a prefix of the refine one."""
    words = lambda n: [rng.randrange(10, 500) for _ in range(n)]   # noqa: E731
    prefix = words(prefix_len)
    sft = prefix + [1] + words(rng.randrange(5, 15))
    refine = prefix + [2] + words(rng.randrange(10, 25))
    select_stem = prefix + [3] + words(8)
    seqs = [sft, refine, select_stem + [4] + words(6), select_stem + [5] + words(6), list(sft),
            refine[: len(refine) - 4]]
    tasks = ["sft", "refine", "select", "select", "sft", "warmup"]
    return [example(s, group, first_index + i, n_target=rng.randrange(1, 5), task=t)
            for i, (s, t) in enumerate(zip(seqs, tasks))]


def n_prefixes(seqs):
    return len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})


def check_tree_batch(batch, by_index):
    """Every example's loss indices, tokens, positions and attention in a tree batch."""
    mask = batch.tree.dense_mask()[0, 0]                                   # [T, T]
    ids = batch.input_ids[0]
    depth = batch.position_ids[0] if batch.position_ids.dim() == 2 else batch.position_ids[0, 0]
    for slot, index in enumerate(batch.example_index.tolist()):
        ex = by_index[index]
        tokens, L, n = ex.input_ids, len(ex), ex.n_target
        mine = batch.segment_ids == slot
        assert torch.equal(batch.target_ids[mine], tokens[L - n:])
        last_pred = int(batch.pred_index[mine][-1])
        path = mask[last_pred].nonzero().flatten()                         # slots it attends to
        assert torch.equal(ids[path], tokens[:L - 1]), "attended slots hold the example's tokens"
        assert torch.equal(depth[path], torch.arange(L - 1)), "positions are depths"
        assert torch.equal(batch.pred_index[mine], path[L - n - 1:])
        for d, s in enumerate(path.tolist()):   # every ancestor sees exactly its own prefix
            assert torch.equal(mask[s].nonzero().flatten(), path[: d + 1])
    assert int(batch.n_target_tokens.sum()) == batch.target_ids.numel()


def test_tree_layout_matches_every_example():
    rng = random.Random(0)
    examples = [ex for g in range(4) for ex in r3v_group(rng, f"g{g}", 6 * g)]
    examples.append(example([7, 8, 9, 10], "alone", 24, n_target=2))      # a one-example trie
    by_index = {ex.index: ex for ex in examples}
    batches = pack(examples, mode="tree", max_tokens=10_000)
    assert len(batches) == 1
    batch = batches[0]
    groups = {}
    for ex in examples:
        groups.setdefault(ex.group, []).append(ex.input_ids.tolist())
    assert batch.n_slots == sum(n_prefixes(seqs) for seqs in groups.values())
    assert batch.n_example_tokens == sum(len(ex) for ex in examples)
    assert sorted(batch.example_index.tolist()) == list(range(len(examples)))
    check_tree_batch(batch, by_index)
    # No attention across tries: a slot's attended slots all belong to its own group.
    slot_group = {}
    mask = batch.tree.dense_mask()[0, 0]
    for slot, index in enumerate(batch.example_index.tolist()):
        last = int(batch.pred_index[batch.segment_ids == slot][-1])
        for s in mask[last].nonzero().flatten().tolist():
            assert slot_group.setdefault(s, by_index[index].group) == by_index[index].group
    for q in range(batch.n_slots):   # (a leaf's last slot predicts nothing: judged by its ancestors)
        seen = {slot_group[k] for k in mask[q].nonzero().flatten().tolist() if k in slot_group}
        assert len(seen) == 1


def test_branch_start_is_predicted_by_the_parent_not_the_previous_slot():
    a = example([1, 2, 3, 4, 5], "g", 0, n_target=2)
    b = example([1, 2, 3, 6, 7], "g", 1, n_target=2)     # branches after token 3
    batch = pack([a, b], mode="tree", max_tokens=100)[0]
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    second = batch.segment_ids == batch.example_index.tolist().index(1)
    assert batch.pred_index[second].tolist() == [2, 5]   # 6 <- slot of 3; 7 <- slot of 6
    assert batch.target_ids[second].tolist() == [6, 7]


def test_rows_fill_exactly_and_respect_the_budget():
    tries = [example(list(range(100, 100 + n)), f"g{n}", i) for i, n in enumerate((30, 50, 20, 45))]
    batches = pack(tries, mode="tree", max_tokens=80)
    sizes = sorted(b.n_slots for b in batches)
    assert sizes == [65, 80]          # first-fit decreasing: 50 + 30, then 45 + 20
    assert any(b.n_slots == 80 for b in batches), "a row filled to exactly max_tokens"
    assert all(b.n_slots <= 80 for b in batches)
    by_index = {ex.index: ex for ex in tries}
    for b in batches:
        check_tree_batch(b, by_index)


def test_group_too_big_for_one_row_is_split_into_tries():
    rng = random.Random(1)
    group = r3v_group(rng, "big", 0, prefix_len=40)
    by_index = {ex.index: ex for ex in group}
    budget = max(len(ex) for ex in group) + 10
    batches = pack(group, mode="tree", max_tokens=budget)
    assert len(batches) > 1 and all(b.n_slots <= budget for b in batches)
    assert sorted(i for b in batches for i in b.example_index.tolist()) == list(range(len(group)))
    for b in batches:
        check_tree_batch(b, by_index)


@pytest.mark.parametrize("mode", ["tree", "none"])
def test_example_longer_than_the_budget_raises(mode):
    with pytest.raises(ValueError, match="q7.*max_tokens=10"):
        pack([example(list(range(20)), "q7", 0)], mode=mode, max_tokens=10)


def test_none_mode_pads_rows_and_predicts_from_the_previous_slot():
    rng = random.Random(2)
    examples = [ex for g in range(3) for ex in r3v_group(rng, f"g{g}", 6 * g)]
    batches = pack(examples, mode="none", max_tokens=200)
    seen = []
    for b in batches:
        B, T = b.input_ids.shape
        assert B * T <= 200 and b.tree is None
        for slot, index in enumerate(b.example_index.tolist()):
            ex = examples[index]
            L, n = len(ex), ex.n_target
            assert torch.equal(b.input_ids[slot, :L], ex.input_ids)
            assert b.attention_mask[slot].tolist() == [1] * L + [0] * (T - L)
            assert torch.equal(b.position_ids[slot, :L], torch.arange(L))
            mine = b.segment_ids == slot
            assert b.pred_index[mine].tolist() == [slot * T + p for p in range(L - n - 1, L - 1)]
            assert torch.equal(b.target_ids[mine], ex.input_ids[L - n:])
            seen.append(index)
    assert sorted(seen) == list(range(len(examples)))


@pytest.mark.parametrize("mode", ["tree", "none"])
def test_shuffle_is_deterministic_and_complete(mode):
    rng = random.Random(3)
    examples = [ex for g in range(8) for ex in r3v_group(rng, f"g{g}", 6 * g)]
    order = lambda seed: [b.example_index.tolist() for b in pack(examples, mode=mode, max_tokens=150,  # noqa: E731
                                                                 shuffle_seed=seed)]
    assert order(1) == order(1)
    assert sorted(sum(order(1), [])) == list(range(len(examples)))
    assert order(1) != order(2)


def test_images_appear_once_per_trie_and_mrope_rows_follow_the_paths():
    """A Qwen2-VL-like group: 3 text, 4 image, then text; image tensors once per trie, in order."""
    def group(name, first, pixels, n_img):
        img = {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 2 * n_img, 2]])}
        prefix = [11, 12, 13] + [5] * n_img + [14, 15]
        seqs = [prefix + [20, 21, 22], prefix + [30, 31], prefix + [20, 40]]
        out = []
        for i, s in enumerate(seqs):
            rope = torch.stack([torch.arange(len(s)) * (r + 1) for r in range(3)])  # distinct rows
            out.append(example(s, name, first + i, n_target=2, image_spans=[(3, 3 + n_img)],
                               image_inputs=img, rope=rope))
        return out
    a = group("a", 0, torch.full((4, 6), 1.0), 4)
    b = group("b", 3, torch.full((2, 6), 2.0), 2)     # a different image size in the same row
    batches = pack(a + b, mode="tree", max_tokens=1000, shuffle_seed=0)
    assert len(batches) == 1
    batch = batches[0]
    assert batch.image_inputs["image_grid_thw"].shape == (2, 3)
    row = batch.input_ids[0].tolist()
    runs = []                      # lengths of the runs of image tokens, in row order
    for s, token in enumerate(row):
        if token == 5:
            if s == 0 or row[s - 1] != 5:
                runs.append(0)
            runs[-1] += 1
    assert sorted(runs) == [2, 4], "each trie holds its image once"
    expected = torch.cat([torch.full((n, 6), 1.0 if n == 4 else 2.0) for n in runs])
    assert torch.equal(batch.image_inputs["pixel_values"], expected)
    assert batch.image_inputs["image_grid_thw"][:, 1].tolist() == [2 * n for n in runs]
    assert batch.position_ids.shape == (4, 1, batch.n_slots)
    by_index = {ex.index: ex for ex in a + b}
    check_tree_batch(batch, by_index)
    mask = batch.tree.dense_mask()[0, 0]
    for slot, index in enumerate(batch.example_index.tolist()):
        ex = by_index[index]
        path = mask[int(batch.pred_index[batch.segment_ids == slot][-1])].nonzero().flatten()
        assert torch.equal(batch.position_ids[1:, 0, path], ex.rope_positions[:, : len(ex) - 1])


def test_a_group_with_two_images_is_rejected():
    a = example([1, 5, 5, 2], "g", 0, image_spans=[(1, 3)])
    b = example([1, 5, 5, 3], "g", 1, image_spans=[(1, 3)])
    b = TokenizedExample(**{**b.__dict__, "image": "other.png"})
    with pytest.raises(ValueError, match="group 'g' mixes images"):
        pack([a, b], mode="tree", max_tokens=100)
