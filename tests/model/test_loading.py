"""Tests for r3v_fast.model.loading: directory checks, offline loading, token ids, lm_head split.

The lm_head/backbone split is checked against the model's own logits with an independent
float64 projection of the backbone's hidden states. Token ids are hand-known: the tiny
tokenizers give the special tokens the first ids, in order.
"""

import json
import shutil
import socket

import pytest
import torch

from r3v_fast.model.loading import (ModelLoadError, check_model_dir, end_of_turn_id,
                                    lm_head_and_backbone, load_vlm, pad_id, stop_token_ids)


# peft 0.21 calls a transformers 5 method that is deprecated (not our code).
peft_warning = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")


@pytest.fixture
def qwen_copy(tiny_qwen2vl_dir, tmp_path):
    """A private copy of the tiny Qwen2-VL directory that a test may damage."""
    return shutil.copytree(tiny_qwen2vl_dir, tmp_path / "model")


def _write_config(directory, **config):
    (directory / "config.json").write_text(json.dumps(config))


# ---- check_model_dir ---------------------------------------------------------------------

def test_check_model_dir_returns_model_type(tiny_qwen2vl_dir, tiny_qwen2_5vl_dir, tiny_llava_dir):
    assert check_model_dir(tiny_qwen2vl_dir) == "qwen2_vl"
    assert check_model_dir(str(tiny_qwen2_5vl_dir)) == "qwen2_5_vl"
    assert check_model_dir(tiny_llava_dir) == "llava"


def _no_config(d):
    (d / "config.json").unlink()


def _broken_json(d):
    (d / "config.json").write_text('{"model_type": "qwen2_vl",')


def _bert(d):
    _write_config(d, model_type="bert", architectures=["BertModel"])


def _no_model_type(d):
    _write_config(d, architectures=["Qwen2VLForConditionalGeneration"])


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _missing_shard(d):
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _no_tokenizer(d):
    (d / "tokenizer.json").unlink()


def _no_processor(d):
    (d / "processor_config.json").unlink()


def _text_only_processor(d):
    (d / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))


@pytest.mark.parametrize("damage, expected", [
    (_no_config, "config.json is missing"),
    (_broken_json, "config.json cannot be read"),
    (_bert, "model_type 'bert' is not supported"),
    (_no_model_type, "no 'model_type'"),
    (_no_weights, "no weights found"),
    (_missing_shard, "model-00002-of-00002.safetensors"),
    (_no_tokenizer, "no tokenizer files"),
    (_no_processor, "no image processor config"),
    (_text_only_processor, "no image processor config"),
])
def test_check_model_dir_names_the_directory_and_the_problem(qwen_copy, damage, expected):
    damage(qwen_copy)
    with pytest.raises(ModelLoadError) as info:
        check_model_dir(qwen_copy)
    message = str(info.value)
    assert str(qwen_copy) in message and expected in message
    # load_vlm runs the same check first, before any heavy work.
    with pytest.raises(ModelLoadError, match="model directory"):
        load_vlm(qwen_copy)


def test_check_model_dir_missing_or_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*never downloaded"):
        check_model_dir("Qwen/Qwen2-VL-2B-Instruct-not-here")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="is not a directory"):
        check_model_dir(tmp_path / "file")


def test_unsupported_type_suggests_and_honours_trust_remote_code(qwen_copy):
    _write_config(qwen_copy, model_type="my_custom_vlm")
    with pytest.raises(ModelLoadError, match="qwen2_5_vl, qwen2_vl.*--trust-remote-code"):
        check_model_dir(qwen_copy)
    assert check_model_dir(qwen_copy, trust_remote_code=True) == "my_custom_vlm"


# ---- load_vlm ----------------------------------------------------------------------------

def test_load_vlm_never_opens_a_socket(tiny_llava_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during load_vlm")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model, processor = load_vlm(tiny_llava_dir)
    assert processor.tokenizer.padding_side == "left"
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_load_vlm_dtype(tiny_qwen2vl_dir):
    model, _ = load_vlm(tiny_qwen2vl_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_vlm_wraps_corrupt_weights(qwen_copy):
    (qwen_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="qwen2_vl model cannot be loaded"):
        load_vlm(qwen_copy)


# ---- token ids ---------------------------------------------------------------------------

def test_end_of_turn_and_pad_ids(tiny_qwen2vl_dir, tiny_llava_dir):
    _, qwen = load_vlm(tiny_qwen2vl_dir)
    _, llava = load_vlm(tiny_llava_dir)
    # Qwen specials: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2; LLaVA: <unk>, <s>, </s>=2, <pad>=3.
    assert (end_of_turn_id(qwen), pad_id(qwen)) == (2, 0)
    assert (end_of_turn_id(llava), pad_id(llava)) == (2, 3)
    assert qwen.tokenizer.convert_ids_to_tokens(end_of_turn_id(qwen)) == "<|im_end|>"
    assert llava.tokenizer.convert_ids_to_tokens(end_of_turn_id(llava)) == "</s>"
    # A bare tokenizer works too; without a pad token, pad falls back to eos.
    tokenizer = qwen.tokenizer
    assert end_of_turn_id(tokenizer) == 2
    tokenizer.pad_token = None
    assert pad_id(tokenizer) == tokenizer.eos_token_id == 2


def test_stop_tokens_include_every_eos_of_the_generation_config(tiny_qwen2vl_dir, tiny_llava_dir):
    model, qwen = load_vlm(tiny_qwen2vl_dir)
    # <|im_end|> (end of turn and tokenizer eos) and <|endoftext|>, listed in generation_config
    assert model.generation_config.eos_token_id == [2, 0]
    assert stop_token_ids(model, qwen) == [0, 2]
    model.generation_config.eos_token_id = 7                 # an int there is read too
    assert stop_token_ids(model, qwen) == [2, 7]
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, qwen) == [2]
    llava_model, llava = load_vlm(tiny_llava_dir)
    assert stop_token_ids(llava_model, llava) == [2]


# ---- lm_head_and_backbone ----------------------------------------------------------------

def _check_split(model, inputs):
    """lm_head(backbone(x)) in float64 must equal the model's own fp32 logits."""
    lm_head, backbone = lm_head_and_backbone(model)
    with torch.no_grad():
        logits = model(**inputs).logits  # [B, L, V]
        hidden = backbone(**inputs)  # [B, L, D]
    weight = lm_head.weight.double()  # [V, D]
    assert hidden.shape == (*logits.shape[:2], weight.shape[1])
    reference = hidden.double() @ weight.T
    if getattr(lm_head, "bias", None) is not None:
        reference += lm_head.bias.double()
    torch.testing.assert_close(logits.double(), reference, rtol=1e-5, atol=1e-5)
    return logits


def _vision_inputs(processor, images):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("fixture", ["tiny_qwen2vl_dir", "tiny_qwen2_5vl_dir", "tiny_llava_dir"])
def test_lm_head_and_backbone_reproduce_logits(fixture, request, rgb_images):
    model, processor = load_vlm(request.getfixturevalue(fixture))
    _check_split(model, _vision_inputs(processor, rgb_images[:2]))


@peft_warning
@pytest.mark.parametrize("fixture", ["tiny_qwen2vl_dir", "tiny_llava_dir"])
def test_lm_head_and_backbone_through_lora(fixture, request, rgb_images):
    from peft import LoraConfig, get_peft_model

    model, processor = load_vlm(request.getfixturevalue(fixture))
    inputs = _vision_inputs(processor, rgb_images[:2])
    with torch.no_grad():
        base_logits = model(**inputs).logits
    # Random (not zero) B matrices, so that the adapters change the output.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    logits = _check_split(peft_model, inputs)
    assert (logits - base_logits).abs().max() > 1e-3


@peft_warning
def test_lm_head_with_lora_is_refused(tiny_qwen2vl_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_vlm(tiny_qwen2vl_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head out of the LoRA target_modules"):
        lm_head_and_backbone(peft_model)


def test_lm_head_and_backbone_llava_next_text_only():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_index=95, image_grid_pinpoints=[[56, 56]], image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    input_ids = torch.randint(0, 95, (2, 7))
    _check_split(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
