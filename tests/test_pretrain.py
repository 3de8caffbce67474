"""Tests for r3v_fast.pretrain and the shipped tiny VLM in r3v_fast/assets/tiny-vlm.

- A drastically shrunk pretraining run (a few steps on a few examples) writes a directory that
  the generic HF path (`load_vlm`) loads and that generates; the same seed gives the same
  weight bytes, another seed different ones.
- The batch collation masks everything but the target: decoding the unmasked label tokens gives
  back exactly "Answer: N" + end-of-turn, written here by hand.
- The committed checkpoint answers fresh shapes-math counting questions far more often than a
  blind guess (the most frequent answer of each question type on the same questions).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from r3v_fast.data import prompts
from r3v_fast.data.records import read_records
from r3v_fast.data.shapes import generate
from r3v_fast.engine.sampler import GREEDY, HFSampler, Request
from r3v_fast.engine.evaluation import is_right
from r3v_fast import pretrain as pt
from r3v_fast.model.loading import end_of_turn_id, load_vlm, pad_id

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vision_depth=1,
            vision_embed_dim=32, vision_num_heads=2, vocab_size=400, batch_caption=1, batch_direct=2,
            batch_cot=1, batch_arithmetic=1, n_cot_easy=2, n_cot_hard=1, steps=3, warmup_steps=1, exclude_test_seed=None)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shrunk_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    runs = {name: pt.pretrain(root / name, seed=seed, log=lambda *a: None, **TINY)
            for name, seed in (("a", 3), ("a_again", 3), ("b", 4))}
    return runs


def test_shrunk_pretraining_loads_through_the_generic_path_and_generates(shrunk_runs, tmp_path):
    out = shrunk_runs["a"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pretrain.json"):
        assert (out / name).is_file(), name
    model, processor = load_vlm(out)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert model.config.text_config.hidden_size == 32
    record = read_records(generate(tmp_path, n_train=0, n_test=1, n_warmup=0, seed=5)["test"])[0][0]
    request = Request(prompts.render(processor, prompts.cot_messages(record)), record.image)
    texts = HFSampler(model, processor, batch_size=1, show_progress=False).sample(
        [request], GREEDY.__class__(k=2, temperature=0.9, max_new_tokens=5, seed=1))
    assert len(texts) == 1 and len(texts[0]) == 2 and all(isinstance(t, str) for t in texts[0])


def test_same_seed_same_bytes_other_seed_other_weights(shrunk_runs):
    a, again, b = (shrunk_runs[n] / "model.safetensors" for n in ("a", "a_again", "b"))
    assert _sha(a) == _sha(again)
    assert (shrunk_runs["a"] / "tokenizer.json").read_bytes() == (shrunk_runs["a_again"] / "tokenizer.json").read_bytes()
    assert _sha(a) != _sha(b)


def test_training_moves_the_weights_away_from_the_random_init(shrunk_runs):
    from safetensors.torch import load_file

    from r3v_fast.model.tiny import make_tiny_qwen2vl

    init, _ = make_tiny_qwen2vl(seed=3, **{k: TINY[k] for k in (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vision_depth", "vision_embed_dim",
        "vision_num_heads")}, vocab_size=TINY["vocab_size"], texts=pt.tokenizer_corpus(3))
    trained = load_file(str(shrunk_runs["a"] / "model.safetensors"))
    init_state = init.state_dict()
    # Saved and in-memory state dicts may name the text decoder differently (checkpoint key
    # conversion): match the same weight by its suffix.
    suffix = "layers.0.mlp.up_proj.weight"
    name = next(n for n in trained if n.endswith(suffix))
    init_name = next(n for n in init_state if n.endswith(suffix))
    assert trained[name].shape == init_state[init_name].shape
    assert not torch.equal(trained[name], init_state[init_name])


def test_collate_masks_all_but_the_target_tokens():
    from r3v_fast.model.tiny import make_tiny_qwen2vl

    _, processor = make_tiny_qwen2vl(seed=0, texts=pt.tokenizer_corpus(0))
    stream = pt._stream("test-collate", 112, set())
    items = [next(stream) for _ in range(3)]
    encode = pt._Encoder(processor, end_of_turn_id(processor))
    batch = pt._collate([encode(item, "direct") for item in items], processor, pad_id(processor))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3   # make_tiny_qwen2vl: up to 112 px
    for row, item in enumerate(items):
        kept = batch["labels"][row][batch["labels"][row] != -100].tolist()
        expected = f"Answer: {item.record.answer}<|im_end|>"
        assert processor.tokenizer.decode(kept) == expected
        # The prompt is the direct prompt, rendered through the chat template, image expanded.
        n_prompt = int(batch["attention_mask"][row].sum()) - len(kept)
        prompt = processor.tokenizer.decode(batch["input_ids"][row][:n_prompt])
        assert prompt.endswith(f"{item.record.question}\n{pt.DIRECT_INSTRUCTION}<|im_end|>\n"
                               "<|im_start|>assistant\n")
        assert prompt.count("<|image_pad|>") == 16


def test_direct_prompt_differs_from_the_cot_prompt():
    record = next(pt._stream("test-prompt", 112, set(), render=False)).record
    direct = prompts.user_text(pt.direct_messages(record))
    assert direct.startswith(record.question)
    assert prompts.COT_INSTRUCTION not in direct and pt.DIRECT_INSTRUCTION in direct


def test_committed_checkpoint_counts_better_than_a_blind_guess(tmp_path):
    assert (pt.PACKAGED_DIR / "model.safetensors").is_file(), "the shipped checkpoint is missing"
    model, processor = load_vlm(pt.PACKAGED_DIR)
    assert model.config.model_type == "qwen2_vl"
    records = read_records(generate(tmp_path, n_train=0, n_test=48, n_warmup=0, seed=77)["test"])[0]
    requests = [Request(prompts.render(processor, pt.direct_messages(r)), r.image) for r in records]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = HFSampler(model, processor, batch_size=48, show_progress=False).sample(
            requests, GREEDY.__class__(k=1, temperature=0.0, max_new_tokens=6))
    finally:
        torch.set_num_threads(previous)
    right = sum(is_right(r, out[0]) for r, out in zip(records, outputs))
    # Blind baseline: for each question type, always answer its most frequent gold answer.
    by_type: dict[str, Counter] = {}
    for r in records:
        by_type.setdefault(r.meta["qtype"], Counter())[r.answer] += 1
    blind = sum(c.most_common(1)[0][1] for c in by_type.values())
    assert right >= blind + len(records) // 8 and right >= len(records) // 2, (right, blind, len(records))


def test_scene_caption_groups_by_colour_then_shape():
    objects = [{"shape": s, "color": c} for s, c in (("square", "blue"), ("circle", "red"),
                                                    ("triangle", "yellow"), ("circle", "red"))]
    assert pt.scene_caption(objects) == (
        "The image shows 2 red circles, 1 blue square and 1 yellow triangle: 4 objects.")
    assert pt.scene_caption(objects[:1]) == "The image shows 1 blue square: 1 object."


def test_streams_skip_held_out_items_and_never_repeat():
    first = [next(pt._stream("test-avoid", 112, set(), render=False)) for _ in range(1)][0]
    held_out = {pt._scene_key(first.record.question, first.record.meta)}
    stream = pt._stream("test-avoid", 112, held_out, render=False)
    keys = [pt._scene_key(item.record.question, item.record.meta)
            for item in (next(stream) for _ in range(200))]
    assert pt._scene_key(first.record.question, first.record.meta) not in keys
    assert len(set(keys)) == len(keys)


def test_arithmetic_lines_are_true_and_never_go_negative():
    import itertools

    for line in itertools.islice(pt._arithmetic_stream("test-arithmetic"), 300):
        expression, value = line.split(" = ")
        tokens = expression.split(" ")
        total = int(tokens[0])
        for op, number in zip(tokens[1::2], tokens[2::2]):
            total = total + int(number) if op == "+" else total - int(number)
            assert total >= 0, line
        assert total == int(value) and 2 <= len(tokens[::2]) <= 4, line


def test_text_only_arithmetic_rows_mix_with_image_rows():
    from r3v_fast.model.tiny import make_tiny_qwen2vl

    model, processor = make_tiny_qwen2vl(seed=0, texts=pt.tokenizer_corpus(0))
    encode = pt._Encoder(processor, end_of_turn_id(processor))
    item = next(pt._stream("test-mixed", 112, set()))
    batch = pt._collate([encode.arithmetic("7 - 2 = 5"), encode(item, "caption")], processor,
                        pad_id(processor))
    assert batch["image_grid_thw"].shape == (1, 3)   # only the caption row has an image
    kept = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert processor.tokenizer.decode(kept) == "7 - 2 = 5<|im_end|>"
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("argv, named", [(["--lr", "-1"], "--lr must be above 0"),
                                         (["--steps", "0"], "--steps must be at least 1"),
                                         (["--min-lr-ratio", "2"], "--min-lr-ratio must be at most 1"),
                                         (["--batch-caption", "0", "--batch-direct", "0", "--batch-cot", "0",
                                           "--batch-arithmetic", "0"], "a step needs at least one item")])
def test_out_of_range_settings_exit_2_naming_the_flag(argv, named, tmp_path, capsys):
    assert pt.main(["--out", str(tmp_path / "out"), *argv]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
