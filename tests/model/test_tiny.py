"""Tests for r3v_fast.model.tiny: the tokenizer, and the saved tiny VLM directories.

Expected image-token counts are computed by hand from the image sizes: Qwen image processor
(14 px patches, 2x2 merge, sides rounded to multiples of 28 within [56*56, 112*112] pixels)
and LLaVA (resize + crop to 56x56, 4x4 patches of 14 px, CLS dropped).
"""

import pytest
import torch

from r3v_fast.model.loading import end_of_turn_id, load_vlm
from r3v_fast.model.tiny import (DEFAULT_TOKENIZER_TEXTS, LLAVA_SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS,
                                 make_tiny_llava, make_tiny_qwen2_5vl, make_tiny_qwen2vl,
                                 train_tokenizer)

# fixture name -> (in-memory builder, image placeholder string, image tokens per rgb_images entry)
MODELS = {
    "tiny_qwen2vl_dir": (make_tiny_qwen2vl, "<|vision_start|><|image_pad|><|vision_end|>", [16, 15, 4]),
    "tiny_qwen2_5vl_dir": (make_tiny_qwen2_5vl, "<|vision_start|><|image_pad|><|vision_end|>", [16, 15, 4]),
    "tiny_llava_dir": (make_tiny_llava, "<image>\n", [16, 16, 16]),
}
QUESTION = "How many red circles are there?"


def _chat(processor, answer=None):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)


def _inputs(processor, images):
    text = _chat(processor)
    return processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True)


@pytest.fixture(params=list(MODELS), ids=lambda name: name.removeprefix("tiny_").removesuffix("_dir"))
def tiny(request):
    builder, placeholder, counts = MODELS[request.param]
    return request.getfixturevalue(request.param), builder, placeholder, counts


# ---- tokenizer ---------------------------------------------------------------------------

def test_tokenizer_encodes_any_text_losslessly():
    tokenizer = train_tokenizer(vocab_size=512)
    for text in ["Answer: 42", "x² + ½ = 3.5 — ok?", "日本語とemoji 🎲\n\ttabs", "  leading spaces"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) <= 512


def test_tokenizer_special_tokens_are_atomic_and_take_first_ids():
    tokenizer = train_tokenizer(vocab_size=512)
    for expected_id, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert tokenizer(f"a{token}b", add_special_tokens=False).input_ids.count(expected_id) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("<|image_pad|><|image_pad|>", add_special_tokens=False).input_ids
    assert ids == [5, 5]


def test_tokenizer_is_deterministic_and_learns_the_corpus():
    first = train_tokenizer(DEFAULT_TOKENIZER_TEXTS, vocab_size=512)
    second = train_tokenizer(DEFAULT_TOKENIZER_TEXTS, vocab_size=512)
    assert first.get_vocab() == second.get_vocab()
    # Merges learned from the corpus: frequent task words take far fewer tokens than bytes.
    word = " triangle"
    assert len(first(word, add_special_tokens=False).input_ids) <= 2 < len(word.encode())


def test_llava_tokenizer_prepends_bos_and_names_roles():
    tokenizer = train_tokenizer(special_tokens=LLAVA_SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>", unk_token="<unk>")
    ids = tokenizer("USER: hi").input_ids
    assert ids[0] == 1 and ids.count(1) == 1  # "<s>" is the second special token
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (2, 3, 0)
    with pytest.raises(ValueError, match="not among special_tokens"):
        train_tokenizer(eos_token="</s>")


# ---- saved directories -------------------------------------------------------------------

def test_saved_dir_reloads_with_identical_processing_and_logits(tiny, rgb_images):
    directory, builder, _, _ = tiny
    reference_model, reference_processor = builder(seed=0)
    model, processor = load_vlm(directory)
    assert type(model) is type(reference_model) and type(processor) is type(reference_processor)
    reference_processor.tokenizer.padding_side = "left"
    inputs = _inputs(processor, rgb_images[:2])
    reference_inputs = _inputs(reference_processor, rgb_images[:2])
    assert inputs.keys() == reference_inputs.keys()
    for key in inputs:
        assert torch.equal(inputs[key], reference_inputs[key]), key
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_model(**inputs).logits)


def test_seed_changes_the_weights():
    first, _ = make_tiny_qwen2vl(seed=0)
    second, _ = make_tiny_qwen2vl(seed=1)
    assert not torch.equal(first.lm_head.weight, second.lm_head.weight)


def test_config_token_ids_match_tokenizer(tiny):
    directory, _, _, _ = tiny
    model, processor = load_vlm(directory)
    tokenizer, config = processor.tokenizer, model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(processor.image_token)
    if hasattr(config, "vision_start_token_id"):
        assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
        assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.get_text_config().vocab_size >= len(tokenizer)
    eos = model.generation_config.eos_token_id
    assert end_of_turn_id(processor) in (eos if isinstance(eos, list) else [eos])


def test_chat_template_places_image_and_processor_expands_it(tiny, rgb_images):
    directory, _, placeholder, counts = tiny
    _, processor = load_vlm(directory)
    text = _chat(processor)
    assert text.count(placeholder) == 1 and QUESTION in text
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for image, expected in zip(rgb_images, counts):
        ids = processor(text=[text], images=[image], return_tensors="pt").input_ids[0]
        assert int((ids == image_id).sum()) == expected
        positions = (ids == image_id).nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[0] + expected))  # contiguous


def test_assistant_turn_ends_with_end_of_turn_token(tiny):
    directory, _, _, _ = tiny
    _, processor = load_vlm(directory)
    prompt, full = _chat(processor), _chat(processor, answer="Answer: 3")
    assert full.startswith(prompt.rstrip())
    encoded = processor.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    answer_end = full.index("Answer: 3") + len("Answer: 3")
    next_token = next(i for i, (start, _) in enumerate(encoded.offset_mapping) if start >= answer_end)
    assert encoded.offset_mapping[next_token][0] == answer_end
    assert encoded.input_ids[next_token] == end_of_turn_id(processor)


def test_generate_runs_with_images_of_different_sizes(tiny, rgb_images):
    directory, _, _, _ = tiny
    model, processor = load_vlm(directory)
    inputs = _inputs(processor, rgb_images[:2])
    assert (inputs.attention_mask[:, -1] == 1).all()  # left padding
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, inputs.input_ids.shape[1] + 4)
    assert torch.equal(out[:, :inputs.input_ids.shape[1]], inputs.input_ids)
