"""Tokenization of R³V examples on the tiny Qwen2-VL and LLaVA processors: prompt tokens are the
processor's, target tokens the tokenizer's plus end-of-turn, M-RoPE ids equal the model's own
get_rope_index, over-long examples are dropped and counted, bad input names the question. The
streaming route (one processor call per image, prompts tokenized as text around an expanded
placeholder) gives exactly the processor's tokens, rope ids and tensors, and tells a refused
image apart from a bad prompt."""

import pytest
import torch
from transformers import AutoProcessor

from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.examples import Example, tokenize_examples


@pytest.fixture(scope="module")
def image_paths(rgb_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("example_images")
    paths = []
    for i, image in enumerate(rgb_images):
        paths.append(str(folder / f"{i}.png"))
        image.save(paths[-1])
    return paths


def examples_for(processor, image, question_id="q0"):
    record = Record(id=question_id, image=image, question="How many red objects are there?",
                    answer="2", dataset="shapes-math")
    render = lambda m: prompts.render(processor, m)   # noqa: E731
    right, wrong = "There are 2 red objects.\nAnswer: 2", "There are 3 red objects.\nAnswer: 3"
    return [
        Example("sft", record.id, image, render(prompts.cot_messages(record)), right, record.id),
        Example("refine", record.id, image, render(prompts.refine_messages(record, wrong)), right, record.id),
        Example("select", record.id, image, render(prompts.select_messages(record, [wrong, right, wrong])),
                prompts.answer_line("2"), record.id),
    ]


@pytest.mark.parametrize("kind", ["qwen2vl", "llava"])
def test_tokens_are_prompt_then_target_then_end_of_turn(kind, tiny_qwen2vl_dir, tiny_llava_dir, image_paths):
    from PIL import Image

    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir if kind == "qwen2vl" else tiny_llava_dir)
    examples = examples_for(processor, image_paths[1])
    tokenized, dropped = tokenize_examples(processor, examples, max_length=10_000)
    assert not dropped and [t.index for t in tokenized] == [0, 1, 2]
    eot = "<|im_end|>" if kind == "qwen2vl" else "</s>"
    for ex, tok in zip(examples, tokenized):
        prompt = processor(text=[ex.prompt], images=[Image.open(ex.image).convert("RGB")], return_tensors="pt")
        target = processor.tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        assert tok.input_ids.tolist() == prompt["input_ids"][0].tolist() + target + [
            processor.tokenizer.convert_tokens_to_ids(eot)]
        assert tok.n_target == len(target) + 1
        assert processor.tokenizer.decode(tok.input_ids[tok.n_prompt:-1]) == ex.target
        torch.testing.assert_close(tok.image_inputs["pixel_values"], prompt["pixel_values"])
        (start, end), = tok.image_spans
        assert (tok.input_ids == tok.input_ids[start]).sum() == end - start
    # One image file: its tensors are held once for the whole group.
    assert all(t.image_inputs["pixel_values"] is tokenized[0].image_inputs["pixel_values"] for t in tokenized)


def test_mrope_positions_equal_the_models_get_rope_index(tiny_qwen2vl_dir, image_paths):
    from transformers import AutoModelForImageTextToText

    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir)
    for path in image_paths[:2]:   # 112x112 and 84x140: a square and a non-square grid
        tok = tokenize_examples(processor, examples_for(processor, path)[:1], max_length=10_000)[0][0]
        ids = tok.input_ids[None]
        token_type = (ids == model.config.image_token_id).long()
        expected, _ = model.model.get_rope_index(ids, mm_token_type_ids=token_type,
                                                 image_grid_thw=tok.image_inputs["image_grid_thw"])
        assert torch.equal(tok.rope_positions, expected[:, 0])


def test_over_long_examples_are_dropped_and_counted(tiny_qwen2vl_dir, image_paths):
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    examples = examples_for(processor, image_paths[0])
    lengths = [len(t) for t in tokenize_examples(processor, examples, max_length=10_000)[0]]
    limit = sorted(lengths)[1]            # keeps the two shortest, drops the longest
    kept, dropped = tokenize_examples(processor, examples, max_length=limit)
    assert dropped == {"too long": 1}
    assert [t.index for t in kept] == [i for i, n in enumerate(lengths) if n <= limit]


def test_bad_input_names_the_question(tiny_qwen2vl_dir, image_paths, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    good = examples_for(processor, image_paths[0], question_id="q42")[0]
    with pytest.raises(ValueError, match="q42.*unknown task 'dpo'"):
        tokenize_examples(processor, [Example("dpo", *list(good.__dict__.values())[1:])], max_length=99)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=f"q42.*{missing}"):
        tokenize_examples(processor, [Example("sft", "q42", missing, good.prompt, good.target, "q42")],
                          max_length=10_000)
    with pytest.raises(ValueError, match="q42.*rejects prompt"):
        tokenize_examples(processor, [Example("sft", "q42", image_paths[0], "Just text.", "x", "q42")],
                          max_length=10_000)
    with pytest.raises(ValueError, match="q42.*no image"):
        tokenize_examples(processor, [Example("sft", "q42", "", good.prompt, good.target, "q42")],
                          max_length=10_000)


@pytest.mark.parametrize("kind", ["qwen2vl", "qwen2_5vl", "llava"])
def test_one_image_many_prompts_gives_the_processors_tokens(kind, tiny_qwen2vl_dir, tiny_qwen2_5vl_dir,
                                                          tiny_llava_dir, image_paths):
    """encode_image + tokenize_with_image: the tokens, rope ids and tensors of tokenize_examples,
    with one processor call per image instead of one per example."""
    from PIL import Image

    from r3v_fast.engine.examples import encode_image, tokenize_with_image

    directory = {"qwen2vl": tiny_qwen2vl_dir, "qwen2_5vl": tiny_qwen2_5vl_dir, "llava": tiny_llava_dir}[kind]
    processor = AutoProcessor.from_pretrained(directory)
    for path in image_paths:                  # 112x112, 84x140, 56x56
        examples = examples_for(processor, path)
        reference, _ = tokenize_examples(processor, examples, max_length=10_000)
        calls = []
        real_call = type(processor).__call__
        try:
            type(processor).__call__ = lambda self, *a, **k: (calls.append(1), real_call(self, *a, **k))[1]
            image_inputs, n_image = encode_image(processor, Image.open(path).convert("RGB"), examples[0].prompt,
                                                 who="q0")
            streamed, dropped = tokenize_with_image(processor, list(enumerate(examples)), image_inputs, n_image,
                                                    max_length=10_000)
        finally:
            type(processor).__call__ = real_call
        assert len(calls) == 1 and not dropped
        for ref, got in zip(reference, streamed, strict=True):
            assert torch.equal(ref.input_ids, got.input_ids) and ref.n_target == got.n_target
            assert ref.image_spans == got.image_spans and ref.index == got.index
            assert (ref.rope_positions is None) == (got.rope_positions is None)
            if ref.rope_positions is not None:
                assert torch.equal(ref.rope_positions, got.rope_positions)
            assert ref.image_inputs.keys() == got.image_inputs.keys()
            assert all(torch.equal(ref.image_inputs[k], got.image_inputs[k]) for k in ref.image_inputs)


def test_a_refused_image_is_told_apart_from_a_bad_prompt(tiny_qwen2vl_dir, image_paths):
    from PIL import Image

    from r3v_fast.engine.examples import ImageRejected, encode_image

    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    prompt = examples_for(processor, image_paths[0])[0].prompt
    strip = Image.new("RGB", (1500, 5))                       # aspect ratio 300: Qwen-VL refuses it
    with pytest.raises(ImageRejected, match="q7: the processor rejects the image"):
        encode_image(processor, strip, prompt, who="q7")
    with pytest.raises(ValueError, match="q7: the prompt has 0 image placeholder") as err:
        encode_image(processor, Image.open(image_paths[0]).convert("RGB"), "no placeholder", who="q7")
    assert not isinstance(err.value, ImageRejected)
