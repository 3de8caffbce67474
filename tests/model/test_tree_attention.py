"""Tree attention: the ancestor mask (by hand), FlexAttention block classes built from ranges
(against block reductions of the dense mask), the FlexAttention path (eager, CPU) against SDPA,
and the attention plug-in leaving ordinary model calls unchanged."""

import random

import pytest
import torch
import torch.nn.functional as F

from r3v_fast.engine.examples import TokenizedExample
from r3v_fast.engine.packing import pack
from r3v_fast.model.tree_attention import enable_tree_attention, tree_attention_forward


def tree_of(groups):
    """TreeMeta of one tree-packed row holding one trie per list of sequences."""
    exs = [TokenizedExample(input_ids=torch.tensor(s), n_target=1, task="sft", group=f"g{g}", index=i)
           for g, seqs in enumerate(groups) for i, s in enumerate(seqs)]
    batches = pack(exs, mode="tree", max_tokens=100_000)
    assert len(batches) == 1
    return batches[0]


def test_ancestor_mask_by_hand():
    # Trie 1: 1 2 3 4 / 1 2 5 / 1 2 3 (a prefix);  trie 2: 7 8.
    batch = tree_of([[[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], [[7, 8]]])
    row = batch.input_ids[0].tolist()
    assert sorted(row) == [1, 2, 3, 4, 5, 7, 8]
    slot = {t: row.index(t) for t in row}
    parent = {1: None, 2: 1, 3: 2, 4: 3, 5: 2, 7: None, 8: 7}
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for t in row:
        a = t
        while a is not None:
            expected[slot[t], slot[a]] = True
            a = parent[a]
    assert torch.equal(batch.tree.dense_mask()[0, 0], expected)


def test_trie_blocks_are_the_diagonal_blocks_of_the_dense_mask():
    tree = random_tries(3, n_tries=5).tree
    blocks = tree.trie_blocks()
    assert len(blocks) == 5 and [b[0] for b in blocks] == [0] * 5
    assert torch.equal(torch.block_diag(*[mask for *_, mask in blocks]), tree.dense_mask()[0, 0])


def random_tries(seed, n_tries=4):
    rng = random.Random(seed)
    groups = []
    for _ in range(n_tries):
        stem = [rng.randrange(1, 50) for _ in range(rng.randrange(1, 70))]
        seqs = []
        for _ in range(rng.randrange(1, 5)):
            cut = rng.randrange(0, len(stem) + 1)
            seqs.append(stem[:cut] + [rng.randrange(50, 99) for _ in range(rng.randrange(1, 60))])
        groups.append(seqs)
    return tree_of(groups)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [4, 16, 128])
def test_block_classes_from_ranges_match_the_dense_mask(seed, block_size):
    tree = random_tries(seed).tree
    dense = tree.dense_mask()[:, 0]                                        # [1, T, T]
    T = dense.shape[-1]
    nb = -(-T // block_size)
    pad = nb * block_size - T
    blocks = F.pad(dense, (0, pad, 0, pad)).view(1, nb, block_size, nb, block_size)
    inside = F.pad(torch.ones(1, T, T, dtype=torch.bool), (0, pad, 0, pad)).view(blocks.shape)
    partial, full = tree.block_classes(block_size)
    assert torch.equal(full, (blocks | ~inside).all(4).all(2))
    assert torch.equal(partial | full, blocks.any(4).any(2))
    assert not (partial & full).any()


def kernel_view(block_mask, T):
    """The mask a FlexAttention kernel applies: full blocks all True, partial blocks mask_mod,
    other blocks skipped; rebuilt from the BlockMask's index tensors."""
    bq, bk = block_mask.BLOCK_SIZE
    nq, nk = -(-T // bq), -(-T // bk)
    out = torch.zeros(nq * bq, nk * bk, dtype=torch.bool)
    for qb in range(nq):
        rows = slice(qb * bq, (qb + 1) * bq)
        q_idx = torch.arange(qb * bq, (qb + 1) * bq)[:, None]
        for kb in block_mask.full_kv_indices[0, 0, qb, : block_mask.full_kv_num_blocks[0, 0, qb]].tolist():
            out[rows, kb * bk:(kb + 1) * bk] = True
        for kb in block_mask.kv_indices[0, 0, qb, : block_mask.kv_num_blocks[0, 0, qb]].tolist():
            k_idx = torch.arange(kb * bk, (kb + 1) * bk)[None, :]
            out[rows, kb * bk:(kb + 1) * bk] = block_mask.mask_mod(0, 0, q_idx, k_idx)
    return out[:T, :T]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("block_size", [8, 128])
def test_block_mask_as_a_kernel_applies_it_equals_the_dense_mask(seed, block_size):
    tree = random_tries(seed).tree
    T = tree.shape[1]
    assert torch.equal(kernel_view(tree.block_mask(block_size), T), tree.dense_mask()[0, 0])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_the_range_block_mask_matches_sdpa():
    """FlexAttention (eager on CPU) accepts the BlockMask built from ranges and equals SDPA with
    the dense mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    tree = random_tries(7, n_tries=3).tree
    T = tree.shape[1]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, T, 16, generator=gen)
    k, v = torch.randn(1, 2, T, 16, generator=gen), torch.randn(1, 2, T, 16, generator=gen)
    block_mask = tree.block_mask(16)
    assert block_mask.full_kv_num_blocks.sum() > 0 and block_mask.kv_num_blocks.sum() > 0
    out = flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True,
                                         attn_mask=tree.dense_mask())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_mismatched_tree_metadata_is_rejected():
    tree = random_tries(1).tree
    T = tree.shape[1]
    q = torch.randn(1, 2, T + 1, 8)
    with pytest.raises(ValueError, match="does not match"):
        tree_attention_forward(torch.nn.Module(), q, q, q, None, r3v_tree=tree)


@pytest.mark.parametrize("kind", ["qwen2vl", "llava"])
def test_enabling_tree_attention_leaves_plain_calls_unchanged(kind, rgb_images):
    """Padded and unpadded batches without tree metadata give the same logits as with SDPA; the
    vision tower keeps its attention implementation."""
    from r3v_fast.model import tiny

    model, processor = (tiny.make_tiny_qwen2vl if kind == "qwen2vl" else tiny.make_tiny_llava)()
    messages = lambda t: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]  # noqa: E731
    texts = [processor.apply_chat_template(messages(t), tokenize=False, add_generation_prompt=True)
             for t in ("How many red circles are there?", "Count the shapes.")]
    processor.tokenizer.padding_side = "right"
    inputs = processor(text=texts, images=rgb_images[:2], return_tensors="pt", padding=True)
    assert not bool(inputs["attention_mask"].all()), "the batch must contain padding"
    single = processor(text=texts[:1], images=rgb_images[:1], return_tensors="pt")
    with torch.no_grad():
        before = [model(**x).logits for x in (inputs, single)]
        enable_tree_attention(model)
        after = [model(**x).logits for x in (inputs, single)]
    assert model.config.get_text_config()._attn_implementation == "r3v_tree"
    assert model.config.vision_config._attn_implementation == "sdpa"
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(after[0][valid], before[0][valid], rtol=0, atol=0)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)


def test_mask_function_builds_nothing_for_tree_batches_and_the_sdpa_mask_otherwise():
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from r3v_fast.model.tree_attention import _tree_mask

    common = dict(batch_size=2, q_length=5, kv_length=5, kv_offset=0, mask_function=causal_mask_function,
                  allow_is_causal_skip=True, dtype=torch.float32, device=torch.device("cpu"))
    assert _tree_mask(attention_mask=None, **common) is None
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(_tree_mask(attention_mask=padding, **common), sdpa_mask(attention_mask=padding, **common))
