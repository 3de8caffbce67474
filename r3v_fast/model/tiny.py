"""Tiny random vision-language models saved as ordinary Hugging Face directories.

No model weights can be downloaded where r3v_fast is built and tested, so tests (and the
embedded default run) build their own VLMs from configs: the real transformers classes
(Qwen2-VL, Qwen2.5-VL, LLaVA) at a tiny width and depth, a small byte-level BPE tokenizer
trained here with `tokenizers`, the model's own processor class and a chat template in the
model family's style. Each is saved with `save_pretrained` (config.json, model.safetensors,
tokenizer and processor files), so `r3v_fast.model.loading.load_vlm` loads it through exactly
the code path of a real checkpoint, with no special case anywhere in the engine.

Sizes: a 112x112 image gives 8x8 patches of 14 px, merged 2x2 into 16 image tokens for the
Qwen models; the LLaVA image processor resizes and crops to 56x56, i.e. 4x4 = 16 patches.
Everything is deterministic given `seed`, and the global torch RNG is left untouched. The
shipped default checkpoint is pretrained from `make_tiny_qwen2vl` by `python -m r3v_fast.pretrain`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# Qwen2-VL chat format: one <|im_start|>role ... <|im_end|> block per message; an image item
# renders as <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one
# <|image_pad|> per merged patch. (The official template also adds a default system prompt;
# the tiny models omit it to keep prompts short.)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaVA-1.5 chat format: "USER: <image>\n... ASSISTANT: ...</s>"; the assistant turn ends with
# eos, and the tokenizer prepends <s> like the Llama tokenizer does.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _default_texts() -> tuple[str, ...]:
    """A small corpus for the tokenizer: shapes-math words, numbers, arithmetic, prompt words."""
    colors = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "gray"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "rectangle", "diamond", "pentagon"]
    texts = [
        "How many objects are there? How many red objects are there? How many circles are there?",
        "Remove all blue objects. How many objects are left? Remove all squares and all green "
        "objects. How many objects are left? Add 2 yellow triangles. How many triangles are there?",
        "I see 2 red circles, 1 blue square and 3 green triangles. I see no yellow objects.",
        "I see 4 squares and 7 objects in all. 7 - 4 = 3. Adding 2 more gives 1 + 2 = 3.",
        "so 2 + 3 - 1 = 4 go, and 6 - 4 = 2 are left. What is the sum? What is the difference?",
        "Let's think step by step. First, count. Then add them up. So the answer is",
        "Answer: 7\nAnswer: 12\nAnswer: 0\nAnswer: A\nAnswer: B\nAnswer: C\nAnswer: D",
        "Think it through step by step, and on the last line write \"Answer:\" followed by the "
        "final answer. Give the answer in cm. Options:\nA. 3\nB. 4\nC. 5\nD. 6",
        "Model's prediction:\nModel's prediction 1:\nModel's prediction 2:\nModel's prediction 3:",
        "The prediction above may contain mistakes. Check every step against the image and the "
        "question, fix what is wrong, and write the corrected solution, ending with the line "
        "\"Answer: <answer>\".",
        "Compare the predictions above with the image and the question, decide which one is "
        "correct, and reply only with its final answer. Judge whether it is right or wrong.",
        "left right top bottom above below next to big small large tiny the a an of in on is are "
        "and or not with each all none more fewer total number sides corners image question.",
        "system user assistant You are a helpful assistant.",
    ]
    for i, color in enumerate(colors):
        for j, shape in enumerate(shapes):
            n = (i + j) % 9 + 1
            texts.append(f"There {'is' if n == 1 else 'are'} {n} {color} {shape}{'' if n == 1 else 's'}. "
                         f"How many {color} {shape}s are there? {n} + {j} = {n + j}")
    texts.append(" ".join(str(n) for n in range(0, 101)))
    texts.extend(f"{a} + {b} = {a + b}, {a} - {b} = {a - b}, {a} * {b} = {a * b}, {a} x {b}"
                 for a in range(0, 13) for b in range(0, 13, 3))
    return tuple(texts)


DEFAULT_TOKENIZER_TEXTS: tuple[str, ...] = _default_texts()


def train_tokenizer(
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 512,
    special_tokens: Sequence[str] = QWEN_SPECIAL_TOKENS,
    bos_token: str | None = None,
    eos_token: str | None = "<|im_end|>",
    pad_token: str | None = "<|endoftext|>",
    unk_token: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (any text encodes) with `special_tokens` as atomic ids.

    The special tokens take the first ids, in order. `bos_token`, if given, is prepended to
    every encoded text (the Llama convention); the other roles are only named. The vocabulary
    holds at most `vocab_size` entries (fewer if the corpus runs out of merges).
    """
    named = [t for t in (bos_token, eos_token, pad_token, unk_token) if t is not None]
    missing = [t for t in named if t not in special_tokens]
    if missing:
        raise ValueError(f"token roles {missing} are not among special_tokens {list(special_tokens)}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: no unknown text
    tokenizer.train_from_iterator(list(DEFAULT_TOKENIZER_TEXTS if texts is None else texts), trainer)
    if bos_token is not None:
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos_token,
                                   eos_token=eos_token, pad_token=pad_token, unk_token=unk_token)


def _mrope_section(head_dim: int) -> list[int]:
    """Split the rotary half-dim into (temporal, height, width) like Qwen2-VL's [16, 24, 24] of 64."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _make_qwen(kind, *, seed, hidden_size, num_layers, num_heads, num_kv_heads, vision_depth,
               vision_embed_dim, vision_num_heads, vocab_size, min_pixels, max_pixels, texts):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = dict(depth=vision_depth, embed_dim=vision_embed_dim, num_heads=vision_num_heads,
                      mlp_ratio=2, hidden_size=hidden_size)  # hidden_size: the merger's output width
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        # window_size 112 px = 4x4 merged patches per attention window; the last block attends
        # over the full image as in the real model (fullatt_block_indexes).
        vision = dict(depth=vision_depth, hidden_size=vision_embed_dim, num_heads=vision_num_heads,
                      intermediate_size=2 * vision_embed_dim, out_hidden_size=hidden_size,
                      window_size=112, fullatt_block_indexes=[vision_depth - 1])
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    roles = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                 pad_token_id=ids["<|endoftext|>"])
    text = dict(vocab_size=max(vocab_size, len(tokenizer)), hidden_size=hidden_size,
                intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=4096, rope_parameters=dict(
                    rope_type="default", rope_theta=10000.0,
                    mrope_section=_mrope_section(hidden_size // num_heads)), **roles)
    config = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], **roles)
    model = _init_model(Model, config, seed)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = Processor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels,
                                              patch_size=14, temporal_patch_size=2, merge_size=2),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor


def _init_model(model_class, config, seed):
    """Random-init `model_class(config)` from `seed` without disturbing the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def _save(model, processor, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_tiny_qwen2vl(*, seed=0, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      vision_depth=1, vision_embed_dim=32, vision_num_heads=2, vocab_size=512,
                      min_pixels=56 * 56, max_pixels=112 * 112, texts=None):
    """In-memory (Qwen2VLForConditionalGeneration, Qwen2VLProcessor) at tiny size."""
    return _make_qwen("qwen2_vl", **locals())


def make_tiny_qwen2_5vl(*, seed=0, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        vision_depth=2, vision_embed_dim=32, vision_num_heads=2, vocab_size=512,
                        min_pixels=56 * 56, max_pixels=112 * 112, texts=None):
    """In-memory (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor) at tiny size."""
    return _make_qwen("qwen2_5_vl", **locals())


def make_tiny_llava(*, seed=0, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    vision_layers=2, vision_embed_dim=32, vision_num_heads=2, image_size=56,
                    vocab_size=512, texts=None):
    """In-memory (LlavaForConditionalGeneration, LlavaProcessor): tiny CLIP vision + tiny Llama."""
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, special_tokens=LLAVA_SPECIAL_TOKENS,
                                bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
    roles = dict(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    num_patches = (image_size // 14) ** 2
    vision = dict(model_type="clip_vision_model", hidden_size=vision_embed_dim,
                  intermediate_size=2 * vision_embed_dim, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_num_heads, image_size=image_size, patch_size=14,
                  projection_dim=vision_embed_dim)
    text = dict(model_type="llama", vocab_size=max(vocab_size, len(tokenizer)),
                hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads, max_position_embeddings=4096, **roles)
    # "default" feature selection drops CLIP's CLS token: image_size/14 squared tokens per image.
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                         image_seq_length=num_patches, vision_feature_select_strategy="default",
                         vision_feature_layer=-2, **roles)
    model = _init_model(LlavaForConditionalGeneration, config, seed)
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def build_tiny_qwen2vl(out_dir, **kwargs) -> Path:
    """Save a tiny random Qwen2-VL (see make_tiny_qwen2vl for the knobs) to `out_dir`."""
    return _save(*make_tiny_qwen2vl(**kwargs), out_dir)


def build_tiny_qwen2_5vl(out_dir, **kwargs) -> Path:
    """Save a tiny random Qwen2.5-VL (see make_tiny_qwen2_5vl) to `out_dir`."""
    return _save(*make_tiny_qwen2_5vl(**kwargs), out_dir)


def build_tiny_llava(out_dir, **kwargs) -> Path:
    """Save a tiny random LLaVA-1.5-style model (see make_tiny_llava) to `out_dir`."""
    return _save(*make_tiny_llava(**kwargs), out_dir)


PACKAGED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-vlm"


def default_model_dir() -> Path:
    """The default ``--model``: the shipped tiny VLM checkpoint (r3v_fast/assets/tiny-vlm, made
    by ``python -m r3v_fast.pretrain``), or, where the package has none, a tiny random Qwen2-VL
    built once into the user cache (deterministic, seed 0)."""
    import os
    import time

    if (PACKAGED_MODEL / "config.json").exists():
        return PACKAGED_MODEL
    cache = Path(os.environ.get("R3V_CACHE") or Path.home() / ".cache" / "r3v_fast")
    target = cache / "tiny-qwen2vl-random-v1"
    if not (target / "config.json").exists():
        tmp = target.with_name(target.name + f".tmp{time.time_ns()}")
        build_tiny_qwen2vl(tmp, seed=0)
        if not (target / "config.json").exists():
            tmp.rename(target)
    return target
