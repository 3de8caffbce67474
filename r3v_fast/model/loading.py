"""Loading a local Hugging Face VLM directory, and the handles the engine needs from it.

`--model DIR` is always a local directory (a real Qwen2-VL / Qwen2.5-VL / LLaVA(-NeXT)
checkpoint, or a tiny one from r3v_fast.model.tiny): nothing is ever downloaded
(`local_files_only=True`) and model code from the directory runs only with an explicit
`trust_remote_code=True`. `check_model_dir` validates the directory in milliseconds, so a bad
`--model` fails with a message naming the directory and the missing piece before any data is
read or weights are loaded.

The engine plugs into the unmodified HF model: `lm_head_and_backbone` hands out the base
model's last hidden states (no [tokens x vocab] logits) and the output projection, which the
fused log-likelihood op consumes; `end_of_turn_id` / `pad_id` give the tokens that end an
assistant turn and pad a batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = {"qwen2_vl", "qwen2_5_vl", "llava", "llava_next"}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # or the BPE pair vocab.json + merges.txt


class ModelLoadError(RuntimeError):
    """A model directory that cannot be loaded; the message says which, what, and what to do."""


def _fail(directory: Path, problem: str, fix: str) -> ModelLoadError:
    return ModelLoadError(f"model directory '{directory}': {problem}. {fix}")


def check_model_dir(path, *, trust_remote_code: bool = False) -> str:
    """Cheaply validate a local model directory before any heavy work; return its model_type.

    Checks, in order: the directory exists; config.json parses and names a model_type that
    r3v_fast supports (any model_type with `trust_remote_code`); weights are present (every
    shard of a sharded checkpoint); tokenizer files; image-processor files. Raises
    ModelLoadError on the first problem.
    """
    directory = Path(path).expanduser()
    layout = ("a local Hugging Face model directory holding config.json, the weights "
              "(model.safetensors), the tokenizer and the processor files")
    if not directory.exists():
        raise _fail(directory, "does not exist",
                    f"Pass {layout}; hub ids are never downloaded, so download the model first.")
    if not directory.is_dir():
        raise _fail(directory, "is not a directory", f"Pass {layout}.")

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise _fail(directory, "config.json is missing", f"Pass {layout}.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(directory, f"config.json cannot be read ({err})",
                    "Restore the file from the original checkpoint.") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise _fail(directory, "config.json has no 'model_type'",
                    "Restore the file from the original checkpoint.")
    if model_type not in SUPPORTED_MODEL_TYPES and not trust_remote_code:
        raise _fail(directory, f"model_type '{model_type}' is not supported",
                    f"Supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}. Other vision-language "
                    "models may work with --trust-remote-code (which runs code from that directory).")

    weights = [name for name in _WEIGHT_FILES if (directory / name).is_file()]
    if not weights:
        raise _fail(directory, f"no weights found (expected one of {', '.join(_WEIGHT_FILES)})",
                    "Copy the complete checkpoint.")
    if weights[0].endswith(".index.json"):
        try:
            shards = set(json.loads((directory / weights[0]).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise _fail(directory, f"{weights[0]} cannot be read ({err})",
                        "Copy the complete checkpoint.") from err
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise _fail(directory, f"weight shards listed in {weights[0]} are missing: "
                        f"{', '.join(missing)}", "Copy the complete checkpoint.")

    has_tokenizer = any((directory / name).is_file() for name in _TOKENIZER_FILES) or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file())
    if not has_tokenizer:
        raise _fail(directory, "no tokenizer files (tokenizer.json, tokenizer.model, or "
                    "vocab.json + merges.txt)", "Copy the tokenizer files of the checkpoint too.")
    if not _has_image_processor(directory):
        raise _fail(directory, "no image processor config (preprocessor_config.json, or "
                    "processor_config.json with an 'image_processor' entry)",
                    "Copy the processor files of the checkpoint too (a text-only model cannot "
                    "be used: R3V needs a vision-language model).")
    return model_type


def _has_image_processor(directory: Path) -> bool:
    if (directory / "preprocessor_config.json").is_file():
        return True
    # transformers 5 saves the image processor inside processor_config.json.
    try:
        processor_config = json.loads((directory / "processor_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(processor_config, dict) and "image_processor" in processor_config


def load_vlm(path, *, dtype: torch.dtype = torch.float32, device="cpu",
             trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """Load (model, processor) from a local directory; never touches the network.

    The model comes in eval mode on `device` in `dtype`; the tokenizer pads on the left, as
    batched generation needs. Raises ModelLoadError (naming the directory) on any failure.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_type = check_model_dir(path, trust_remote_code=trust_remote_code)
    directory = Path(path).expanduser()
    common = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(directory, **common)
    except Exception as err:  # noqa: BLE001 - any failure here means "unusable processor files"
        raise _fail(directory, f"the processor cannot be loaded ({type(err).__name__}: {err})",
                    "Check the tokenizer and processor files against the original checkpoint.") from err
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise _fail(directory, f"loads as {type(processor).__name__}, not a processor with both a "
                    "tokenizer and an image processor", "Pass a vision-language model directory.")
    tokenizer.padding_side = "left"

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # device_map wants a concrete GPU
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        # device_map places the weights directly on `device`, without a CPU copy first.
        model = AutoModelForImageTextToText.from_pretrained(
            directory, dtype=dtype, device_map={"": device},
            attn_implementation=attn_implementation, **common)
    except Exception as err:  # noqa: BLE001 - report the directory, keep the cause chained
        raise _fail(directory, f"the {model_type} model cannot be loaded ({type(err).__name__}: {err})",
                    "Check the weights against config.json, or try attn_implementation='eager'.") from err
    return model.eval(), processor


def tokenizer_of(processor):
    """The text tokenizer of a processor (a bare tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


def unwrap_peft(model):
    """The HF model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_decoders(model, purpose: str = "this") -> list[nn.Module]:
    """The language-model sub-models of an HF VLM (or its peft wrapper): the PreTrainedModels
    whose config is the text config. ``purpose`` names the caller in the error message."""
    from transformers import PreTrainedModel

    base = unwrap_peft(model)
    text_config = base.config.get_text_config()
    decoders = [m for m in base.modules() if isinstance(m, PreTrainedModel) and m.config is text_config]
    if not decoders:
        raise ValueError(f"cannot find the language model of {type(base).__name__} for {purpose}")
    return decoders


def set_decoder_attention(model, name: str, purpose: str) -> list[str]:
    """Switch the text decoder(s) to attention implementation ``name``; returns the previous
    implementation of each, for :func:`restore_decoder_attention`. The vision tower keeps its own."""
    decoders = text_decoders(model, purpose)
    previous = [d.config._attn_implementation for d in decoders]
    for decoder in decoders:
        if decoder.config._attn_implementation != name:
            decoder.set_attn_implementation(name)
    return previous


def restore_decoder_attention(model, previous: list[str]) -> None:
    for decoder, name in zip(text_decoders(model), previous):
        if decoder.config._attn_implementation != name:
            decoder.set_attn_implementation(name)


def end_of_turn_id(processor) -> int:
    """The token that ends an assistant turn: <|im_end|> for ChatML (Qwen) templates, else eos."""
    tokenizer = tokenizer_of(processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = "".join(template.values())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    known = im_end is not None and im_end != tokenizer.unk_token_id
    if known and (not isinstance(template, str) or "<|im_end|>" in template):
        return int(im_end)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither <|im_end|> nor an eos token")
    return int(tokenizer.eos_token_id)


def stop_token_ids(model, processor) -> list[int]:
    """Tokens that end a generated reply: the end-of-turn token, the tokenizer's eos, and every
    eos listed in the model's ``generation_config`` (an int or a list there)."""
    ids = {end_of_turn_id(processor), tokenizer_of(processor).eos_token_id}
    config = getattr(unwrap_peft(model), "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    ids.update(listed if isinstance(listed, (list, tuple)) else [listed])
    return sorted(int(i) for i in ids if i is not None)


def pad_id(processor) -> int:
    """The padding token id: the tokenizer's pad token, else its eos token."""
    tokenizer = tokenizer_of(processor)
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token")


def decoder_layer_classes(model) -> list[str]:
    """Class names of the language model's decoder layers (e.g. ["Qwen2VLDecoderLayer"]): the
    units FSDP shards one by one (``transformer_cls_names_to_wrap``)."""
    base = unwrap_peft(model)
    for name, module in base.named_modules():
        if name.endswith("language_model.layers") and isinstance(module, nn.ModuleList) and len(module):
            return sorted({type(layer).__name__ for layer in module})
    raise ValueError(f"{type(base).__name__}: no language_model.layers list found to shard layer by layer")


def lm_head_and_backbone(model) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """Split a *ForConditionalGeneration VLM (or a peft wrapper of one) into (lm_head, backbone).

    `lm_head` is the output projection (`.weight` [V, D], maybe `.bias`); `backbone(**inputs)`
    runs the base model (vision tower + decoder, LoRA adapters included) on the processor's
    inputs and returns the final-norm hidden states [B, L, D], without computing logits, so
    that lm_head(backbone(**inputs)) equals model(**inputs).logits.
    """
    base = unwrap_peft(model)
    lm_head = base.get_output_embeddings()
    if lm_head is None or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(base).__name__} has no output projection with a .weight")
    if hasattr(lm_head, "base_layer"):
        raise ValueError("the output projection carries a LoRA adapter, which the fused loss "
                         "would ignore; leave lm_head out of the LoRA target_modules")
    # transformers 5 VLMs: Qwen2VLModel / Qwen2_5_VLModel / LlavaModel / LlavaNextModel.
    inner = getattr(base, "model", None)
    if not isinstance(inner, nn.Module):
        raise ValueError(f"{type(base).__name__} has no .model backbone under its lm_head")

    def backbone(**inputs) -> torch.Tensor:
        for key in ("labels", "logits_to_keep", "return_dict"):
            inputs.pop(key, None)
        inputs.setdefault("use_cache", False)  # training and scoring need no KV cache
        return inner(**inputs, return_dict=True).last_hidden_state  # [B, L, D]

    return lm_head, backbone
