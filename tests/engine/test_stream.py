"""The streaming data path against the eager one (the reference: every example through the
processor with its image, up front).

- The same micro-batches, field by field (token ids, positions, tree layout, targets, segment
  ids, image tensors), for the tiny Qwen2-VL, Qwen2.5-VL and LLaVA processors and a LLaVA-NeXT
  one (anyres tiles), tree and none packing, one and two ranks, with over-long examples
  dropped, in worker processes and in-process.
- Training on it gives the same weights; a run interrupted mid-epoch and resumed gives the same
  later batches and the same weights as an uninterrupted one.
- An image that cannot be decoded, met in a worker mid-epoch, leaves its question out (counted,
  named, logged once) and the run goes on; one missing at plan time is left out of the plan.
- The length pass's decisions equal the eager drops and do not depend on how the groups are
  split between ranks; its byte bound is never below the real length.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from transformers import AutoProcessor

from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.examples import Example, ExampleLengths, tokenize_examples
from r3v_fast.engine.stream import (GroupWork, StepSampler, default_num_workers, measure_lengths, rank_share,
                                    step_loader, workers_started)
from r3v_fast.engine.trainer import TrainOptions, Trainer
from r3v_fast.model.loading import load_vlm, pad_id

# (height, width, file format) of the question images: square, landscape, portrait, tiny, odd.
IMAGES = [(112, 112, "png"), (84, 140, "jpg"), (140, 84, "png"), (56, 56, "jpg"), (150, 200, "png"),
          (30, 90, "jpg"), (97, 61, "png"), (128, 96, "jpg")]


def write_images(folder, specs=IMAGES):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w, fmt) in enumerate(specs):
        path = folder / f"img{i}.{fmt}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def question_examples(processor, qid, image, i):
    """The R³V examples of one question: SFT, refine and (for every other question) two selects."""
    record = Record(id=qid, image=image, question=f"How many red objects are there in picture {i}?" + " Look." * (i % 3),
                    answer=str(i % 5), dataset="shapes-math")
    render = lambda m: prompts.render(processor, m)   # noqa: E731
    right = f"I see {i % 5} red objects" + " and more" * (i % 4) + f".\nAnswer: {i % 5}"
    wrong = f"I see {i % 5 + 1} red objects.\nAnswer: {i % 5 + 1}"
    out = [Example("sft", qid, image, render(prompts.cot_messages(record)), right, qid),
           Example("refine", qid, image, render(prompts.refine_messages(record, wrong)), right, qid)]
    if i % 2 == 0:
        for order in ([right, wrong, wrong], [wrong, right, wrong]):
            out.append(Example("select", qid, image, render(prompts.select_messages(record, order)),
                               prompts.answer_line(str(i % 5)), qid))
    return out


def mix(processor, paths):
    return [ex for i, path in enumerate(paths) for ex in question_examples(processor, f"q{i}", path, i)]


def options(**changes):
    base = dict(epochs=2, lr=1e-3, batch_size=5, max_tokens=600, max_length=1000, lora_r=0, save_every=0,
                warmup_steps=1, num_workers=1)
    return TrainOptions(**{**base, **changes})


def fake_trainer(processor, opts, rank=0, world=1):
    """A Trainer whose planning and eager batching run without a model (rank r of w)."""
    return Trainer(None, processor, SimpleNamespace(process_index=rank, num_processes=world), opts, "/nonexistent",
                   log=lambda *a: None, show_progress=False)


def assert_same_batch(a, b):
    assert a.tasks == b.tasks and a.groups == b.groups and a.question_ids == b.question_ids
    assert a.n_example_tokens == b.n_example_tokens
    for name in ("input_ids", "position_ids", "pred_index", "target_ids", "segment_ids", "example_index",
                 "n_target_tokens"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.attention_mask is None) == (b.attention_mask is None)
    if a.attention_mask is not None:
        assert torch.equal(a.attention_mask, b.attention_mask)
    assert (a.tree is None) == (b.tree is None)
    if a.tree is not None:
        for name in ("node_of_token", "node_start", "node_end", "node_row", "ancestor"):
            assert torch.equal(getattr(a.tree, name), getattr(b.tree, name)), name
    assert a.image_inputs.keys() == b.image_inputs.keys()
    for key in a.image_inputs:
        assert torch.equal(a.image_inputs[key], b.image_inputs[key]), key


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("stream_images"))


def llava_next_processor():
    """A LLaVA-NeXT processor (anyres tiling over 56 px tiles) with the tiny LLaVA tokenizer;
    no model is needed to compare the two data paths."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from r3v_fast.model.tiny import LLAVA_CHAT_TEMPLATE, make_tiny_llava

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=make_tiny_llava()[1].tokenizer,
                              patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


@pytest.mark.parametrize("packing", ["tree", "none"])
@pytest.mark.parametrize("kind", ["tiny_qwen2vl_dir", "tiny_qwen2_5vl_dir", "tiny_llava_dir", "llava_next"])
def test_stream_yields_the_eager_batches(kind, packing, image_paths, request):
    if kind == "llava_next":
        processor = llava_next_processor()
    else:
        processor = AutoProcessor.from_pretrained(request.getfixturevalue(kind))
    examples = mix(processor, image_paths)
    lengths = sorted(len(t) for t in tokenize_examples(processor, examples, max_length=10**6)[0])
    # A limit that drops the longest few examples: both paths must drop the same ones.
    opts = options(packing=packing, max_length=lengths[-4])
    tokenized, eager_steps, dropped, _ = fake_trainer(processor, opts)._plan_eager(examples, {})
    kept, steps, stream_dropped, skipped = fake_trainer(processor, opts)._plan_stream(examples)
    assert dropped == stream_dropped == {"too long": sum(n > lengths[-4] for n in lengths)} and not skipped
    assert dropped["too long"] >= 1
    assert [[tokenized[i].index for i in step] for step in eager_steps] == steps
    for world, workers in ((1, 1), (2, 0)):
        for rank in range(world):
            eager = list(fake_trainer(processor, opts, rank, world)._eager_batches(tokenized, eager_steps, 0))
            loader = step_loader(processor, examples, steps, start=0, rank=rank, world=world, mode=packing,
                                 max_tokens=opts.max_tokens, max_length=opts.max_length, pad_id=pad_id(processor),
                                 num_workers=workers, pin_memory=False)
            with workers_started():
                streamed = list(loader)
            assert [s.step for s in streamed] == list(range(len(steps)))
            assert len(streamed) == len(eager)
            for e, s in zip(eager, streamed):
                assert len(e.batches) == len(s.batches) and not s.skipped and not s.late_too_long
                for a, b in zip(e.batches, s.batches):
                    assert_same_batch(a, b)
            # Each question's image is processed once per step (eager: once per example).
            assert [s.images_processed for s in streamed] == [
                len(rank_share(examples, steps[s.step], rank, world)) for s in streamed]


def test_length_pass_is_exact_and_independent_of_the_split(tiny_qwen2vl_dir, image_paths):
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    examples = mix(processor, image_paths)
    tokenized = {t.index: len(t) for t in tokenize_examples(processor, examples, max_length=10**6)[0]}
    lengths = ExampleLengths(processor)
    from r3v_fast.model.image_tokens import image_token_count

    for i, ex in enumerate(examples):
        with Image.open(ex.image) as img:
            n_image = image_token_count(processor, img.height, img.width)
        assert lengths.exact(ex, n_image, who="x") == tokenized[i]
        assert lengths.bound(ex, n_image) >= tokenized[i]
    limit = sorted(tokenized.values())[len(tokenized) // 2]
    whole = measure_lengths(processor, examples, range(len(examples)), max_length=limit)
    assert set(whole.dropped) == {i for i, n in tokenized.items() if n > limit}
    groups = sorted({ex.group for ex in examples})
    halves = [measure_lengths(processor, examples, [i for i, ex in enumerate(examples) if ex.group in groups[r::2]],
                              max_length=limit) for r in range(2)]
    assert {**halves[0].dropped, **halves[1].dropped} == whole.dropped
    # Under a limit above every byte bound no example needs the tokenizer.
    roomy = max(lengths.bound(ex, 16) for ex in examples)
    loose = measure_lengths(processor, examples, range(len(examples)), max_length=roomy)
    assert loose.tokenized == 0 and not loose.dropped


def test_sampler_resumes_at_any_step_and_marks_empty_shares(tiny_qwen2vl_dir, image_paths):
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    examples = mix(processor, image_paths)
    _, steps, _, _ = fake_trainer(processor, options())._plan_stream(examples)
    full = list(StepSampler(examples, steps, rank=1, world=2))
    assert list(StepSampler(examples, steps, start=3, rank=1, world=2)) == full[3:]
    # A rank with no group in a step still gets the step number.
    lonely = list(StepSampler(examples, [steps[0][:1]], rank=1, world=2))
    assert lonely == [[GroupWork(0, ())]]


def test_default_worker_count(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers() == 1


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny_model(tiny_qwen2vl_dir):
    model, processor = load_vlm(tiny_qwen2vl_dir)
    return model, processor


def train(model, processor, examples, state_dir, log=None, **changes):
    changes = {"max_tokens": 2000, **changes}
    trainer = Trainer(copy.deepcopy(model), processor, Accelerator(cpu=True), options(**changes), state_dir,
                      log=log or (lambda *a: None), show_progress=False)
    summary = trainer.train(examples)
    return trainer.model, summary


def assert_same_weights(a, b):
    b_params = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, b_params[name]), name


def test_training_on_the_stream_gives_the_eager_weights(tiny_model, image_paths, tmp_path):
    model, processor = tiny_model
    examples = mix(processor, image_paths)
    eager, eager_summary = train(model, processor, examples, tmp_path / "a", data_path="eager")
    stream, stream_summary = train(model, processor, examples, tmp_path / "b", data_path="stream")
    assert eager_summary["steps"] == stream_summary["steps"] > 2
    assert [h["loss"] for h in eager_summary["history"]] == [h["loss"] for h in stream_summary["history"]]
    assert_same_weights(eager, stream)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), stream.parameters()))
    # Eager processes every example's image; the stream each question's image once per epoch.
    assert eager_summary["images_processed"] == len(examples)
    assert stream_summary["images_processed"] == 2 * len(image_paths)


def test_resume_mid_epoch_gives_the_same_batches_and_weights(tiny_model, image_paths, tmp_path, monkeypatch):
    model, processor = tiny_model
    examples = mix(processor, image_paths)
    seen: dict[str, list] = {"straight": [], "resumed": []}
    real = Trainer._step
    run = {"name": "straight", "stop_at": None}

    def recording(self, wrapper, optimizer, scheduler, step_batch, step):
        if step == run["stop_at"]:
            run["stop_at"] = None
            raise KeyboardInterrupt
        seen[run["name"]].append((step, [b.input_ids for b in step_batch.batches],
                                  [b.image_inputs["pixel_values"] for b in step_batch.batches]))
        return real(self, wrapper, optimizer, scheduler, step_batch, step)

    monkeypatch.setattr(Trainer, "_step", recording)
    straight, summary = train(model, processor, examples, tmp_path / "straight", save_every=1)
    n_steps = summary["steps"]
    stop = n_steps // 2 + 1                       # inside the second epoch
    run.update(name="resumed", stop_at=stop)
    with pytest.raises(KeyboardInterrupt):
        train(model, processor, examples, tmp_path / "resumed", save_every=1)
    log = []
    resumed, _ = train(model, processor, examples, tmp_path / "resumed", save_every=1, log=log.append)
    assert f"resuming training at step {stop}/{n_steps}" in log
    later = [item for item in seen["straight"] if item[0] >= stop]
    assert [item[0] for item in seen["resumed"]] == list(range(stop)) + list(range(stop, n_steps))
    for (s1, ids1, px1), (s2, ids2, px2) in zip(later, seen["resumed"][stop:]):
        assert s1 == s2 and all(torch.equal(a, b) for a, b in zip(ids1, ids2))
        assert all(torch.equal(a, b) for a, b in zip(px1, px2))
    assert_same_weights(straight, resumed)


def truncated_jpeg(path, size=(96, 64)):
    """A JPEG whose header is intact (the plan reads its size) but whose pixel data is cut."""
    full = path.with_suffix(".full.jpg")
    Image.effect_noise(size, 60).convert("RGB").save(full, quality=95)
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    return str(path)


@pytest.mark.parametrize("workers", [1, 0])
def test_corrupt_image_mid_epoch_is_skipped_counted_and_named(tiny_model, image_paths, tmp_path, workers):
    model, processor = tiny_model
    paths = list(image_paths)
    paths[3] = truncated_jpeg(tmp_path / "broken.jpg")
    paths[5] = str(tmp_path / "gone.png")                 # missing: found by the plan's header check
    examples = mix(processor, paths)
    log = []
    _, summary = train(model, processor, examples, tmp_path / "state", log=log.append, num_workers=workers)
    n_q3 = sum(ex.group == "q3" for ex in examples)
    n_q5 = sum(ex.group == "q5" for ex in examples)
    assert summary["skipped"] == {"corrupt image": n_q3, "missing image": n_q5}
    assert summary["skipped_questions"] == ["q3", "q5"]
    assert summary["examples"] == len(examples) - n_q5          # q3 is in the plan, left out when met
    messages = [m for m in log if m.startswith("skipped")]
    assert len(messages) == 2                                    # once per question, not once per epoch
    assert any("'q3'" in m and "cannot read image" in m and "broken.jpg" in m for m in messages)
    assert any("'q5'" in m and "not found" in m for m in messages)
    assert len(summary["history"]) == summary["steps"] and all(np.isfinite(h["loss"]) for h in summary["history"])


def test_a_bad_prompt_in_a_worker_stops_the_run_with_its_question(tiny_model, image_paths, tmp_path):
    model, processor = tiny_model
    # Every question's SFT prompt lost its image placeholder: the first step's worker meets one.
    examples = [Example(ex.task, ex.group, ex.image, "no placeholder here", ex.target, ex.question_id)
                if ex.task == "sft" else ex for ex in mix(processor, image_paths)]
    with pytest.raises(ValueError, match=r"question 'q\d+' \(sft example \d+\).*0 image placeholder"):
        train(model, processor, examples, tmp_path / "state")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_arrive_pinned_and_move_to_the_device(tiny_qwen2vl_dir, image_paths):
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    examples = mix(processor, image_paths)
    _, steps, _, _ = fake_trainer(processor, options())._plan_stream(examples)
    loader = step_loader(processor, examples, steps[:2], start=0, rank=0, world=1, mode="tree", max_tokens=600,
                         max_length=1000, pad_id=pad_id(processor), num_workers=1, pin_memory=True)
    with workers_started():
        first = next(iter(loader))
    batch = first.batches[0]
    assert batch.input_ids.is_pinned() and batch.image_inputs["pixel_values"].is_pinned()
    assert batch.tree.ancestor.is_pinned()
    moved = batch.to("cuda", non_blocking=True)
    assert moved.input_ids.is_cuda and torch.equal(moved.target_ids.cpu(), batch.target_ids)
