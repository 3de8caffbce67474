"""Pretraining of the embedded default model: a tiny Qwen2-VL that sees shapes-math scenes.

`python -m r3v_fast.train` with no arguments must show R³V self-improvement on a laptop CPU,
and no weights can be downloaded, so the project trains its own base VLM here, from a seed:

1. a byte-level BPE tokenizer trained on the task's text (questions, worked solutions, the
   CoT / refine / select / direct prompts), so that prompts stay short;
2. a tiny random Qwen2-VL (r3v_fast.model.tiny: the real transformers class at tiny width).
   Its processor resizes the 112 px shapes-math images to 84 px: 6x6 patches of 14 px, merged
   2x2 into 9 image tokens, one per cell of the scenes' 3x3 layout;
3. next-token training on target tokens only (plain HF forward with `labels`, AdamW, linear
   warm-up then cosine decay to a floor). Every step's batch mixes
   - scene captions ("The image shows 2 red circles and 1 blue square: 3 objects."), the dense
     perception signal: colour, shape and count of everything in the image;
   - direct-answer QA over every question type, with its own short prompt (question + "reply
     with the final answer only"), which teaches the `Answer: N` line;
   - text-only arithmetic ("Work out 8 - 3." -> "8 - 3 = 5"), the sums and differences that
     worked solutions write; a tiny language model does not bring them along;
   - a SMALL templated CoT warm-up set (`shapes.template_cot` with the CoT prompt of
     r3v_fast.data.prompts), drawn almost only from the easy counting types, so the model
     writes "I see ... Answer: N" but reasons weakly on the remove / add questions. This mirrors
     the paper's base models, whose zero-shot CoT is weak: R³V has something to lift.
   Captions and direct QA are drawn fresh at every step (a seeded stream), so the model learns
   to look rather than to remember scenes.
The result is an ordinary HF directory (config.json, model.safetensors, tokenizer and
processor files) that `r3v_fast.model.loading.load_vlm` loads like a real checkpoint, plus
`pretrain.json` (configuration, loss curve, wall time). The shipped copy is
r3v_fast/assets/tiny-vlm.

Held-out hygiene: no pretraining item repeats a question of the default shapes-math test
split (same question about the same objects in the same cells), and no caption describes one
of its scenes.

Determinism: model init, data streams and batch order all derive from `seed`, and training
runs with a fixed number of intra-op threads (1 by default), so the same seed gives the same
checkpoint bytes on the same machine.

    python -m r3v_fast.pretrain --out DIR [--seed S] [--evaluate]     (--help: every setting)
    (the default seed, SHIPPED_SEED = 1, is the shipped checkpoint's; seed 0 gives a base whose
    zero-shot CoT is already near its direct-answer ceiling)

The shipped checkpoint was trained with a hand-written schedule whose cosine decay ran one
step behind transformers' ``cosine_with_min_lr`` used here (same warm-up, same end points),
so a rebuild now gives slightly different bytes (see the README).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import torch

from r3v_fast.config import UsageError, add_options, check_ranges, new_parser, option
from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.data.shapes import COLORS, QUESTION_TYPES, SHAPES, make_item, render_scene, template_cot
from r3v_fast.engine.trainer import lr_schedule

__all__ = ["PretrainConfig", "DIRECT_INSTRUCTION", "direct_messages", "tokenizer_corpus",
           "pretrain", "evaluate_checkpoint", "main"]

PACKAGED_DIR = Path(__file__).resolve().parent / "assets" / "tiny-vlm"
SHIPPED_SEED = 1  # the seed of the shipped checkpoint (with PretrainConfig's defaults)

DIRECT_INSTRUCTION = prompts.DIRECT_INSTRUCTION   # the warm-up direct-answer prompt of the engine
CAPTION_PROMPT = "List the objects in the image by colour and shape."
ARITHMETIC_PROMPT = "Work out {expression}."
EASY_TYPES = tuple(t for t, level in QUESTION_TYPES.items() if level <= 2)


@dataclass(frozen=True)
class PretrainConfig:
    title: ClassVar[str] = "pretraining"
    seed: int = option(SHIPPED_SEED, "seed of the model, the tokenizer corpus and every data stream", at_least=0)
    # model (r3v_fast.model.tiny.make_tiny_qwen2vl knobs)
    hidden_size: int = option(128, "width of the language model", at_least=1)
    num_layers: int = option(4, "layers of the language model", at_least=1)
    num_heads: int = option(4, "attention heads of the language model", at_least=1)
    num_kv_heads: int = option(2, "key/value heads of the language model", at_least=1)
    vision_depth: int = option(2, "blocks of the vision tower", at_least=1)
    vision_embed_dim: int = option(64, "width of the vision tower", at_least=1)
    vision_num_heads: int = option(2, "attention heads of the vision tower", at_least=1)
    vocab_size: int = option(1024, "size of the byte-level BPE vocabulary to train", at_least=1)
    image_size: int = option(112, "shapes-math render size in px (the default split's)", at_least=28)
    vision_side: int = option(84, "the processor resizes images to at most this side, px", at_least=28)
    # data: each step's batch = fresh captions + fresh direct QA + CoT warm-up items
    batch_caption: int = option(12, "scene captions per step (drawn fresh)", at_least=0)
    batch_direct: int = option(16, "direct-answer questions per step (drawn fresh)", at_least=0)
    batch_cot: int = option(4, "worked CoT solutions per step, from the warm-up set", at_least=0)
    batch_arithmetic: int = option(4, "text-only sums and differences per step", at_least=0)
    n_cot_easy: int = option(300, "CoT warm-up items of the counting types (level <= 2)", at_least=0)
    n_cot_hard: int = option(20, "CoT warm-up items of the harder types (level >= 3)", at_least=0)
    exclude_test_seed: int | None = option(0, "skip items of the default test split of this seed; none = no check",
                                           at_least=0)
    # optimisation
    steps: int = option(2500, "optimizer steps", at_least=1)
    lr: float = option(3e-3, "peak learning rate", above=0)
    min_lr_ratio: float = option(0.1, "cosine decay to lr * min_lr_ratio", at_least=0, at_most=1)
    warmup_steps: int = option(50, "steps of linear warm-up", at_least=0)
    weight_decay: float = option(0.01, "AdamW weight decay of the matrices", at_least=0)
    vision_lr_scale: float = option(0.1, "vision-encoder lr = lr * this (0 freezes it)", at_least=0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this", above=0)
    threads: int = option(1, "intra-op threads: fixed, so the result is reproducible", at_least=1)

    @property
    def batch_size(self) -> int:
        return self.batch_caption + self.batch_direct + self.batch_cot + self.batch_arithmetic


# -- prompts and data -----------------------------------------------------------------------------

def direct_messages(record: Record) -> list[dict]:
    """Chat messages asking for the answer at once (no rationale): the engine's direct-QA prompt."""
    return prompts.direct_messages(record)


def caption_messages() -> list[dict]:
    """Chat messages asking for a description of the scene (the caption task)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]


def scene_caption(objects: list[dict]) -> str:
    """'The image shows 2 red circles and 1 blue square: 3 objects.' Groups by colour, then
    shape, in the palette and shape order of r3v_fast.data.shapes (the template CoT's order)."""
    groups = []
    for color in COLORS:
        for shape in SHAPES:
            n = sum(o["color"] == color and o["shape"] == shape for o in objects)
            if n:
                groups.append(f"{n} {color} {shape}" + ("" if n == 1 else "s"))
    listing = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    return f"The image shows {listing}: {len(objects)} object{'' if len(objects) == 1 else 's'}."


def arithmetic_messages(expression: str) -> list[dict]:
    """Text-only chat messages asking to evaluate `expression` ('7 - 2', '1 + 2 + 1')."""
    return [{"role": "user", "content": [{"type": "text", "text": ARITHMETIC_PROMPT.format(expression=expression)}]}]


def _arithmetic_stream(name: str) -> Iterator[str]:
    """Endless '<expression> = <value>' lines in the shapes of the template CoT's arithmetic:
    mostly two terms of 0-9 ('8 - 3 = 5', '2 + 4 = 6'), sometimes three or four small terms
    ('2 + 1 + 3 = 6', '3 + 2 - 1 = 4'); no partial result below 0."""
    rng = random.Random(name)
    while True:
        n_terms = rng.choices((2, 3, 4), weights=(6, 3, 1))[0]
        top = 9 if n_terms == 2 else 5
        value = rng.randint(0, top)
        text = str(value)
        for _ in range(n_terms - 1):
            b = rng.randint(0, top)
            if rng.random() < 0.5 and value - b >= 0:
                value, text = value - b, f"{text} - {b}"
            else:
                value, text = value + b, f"{text} + {b}"
        yield f"{text} = {value}"


@dataclass
class _Item:
    record: Record
    image: object  # PIL image, rendered once (None where only the text is needed)


def _scene_key(question: str, meta: dict) -> tuple:
    return question, tuple((o["cell"], o["shape"], o["color"]) for o in meta["objects"])


def _held_out_keys(test_seed: int | None) -> set:
    """Keys of the default test split: its questions, and its scenes (for the captions)."""
    if test_seed is None:
        return set()
    from r3v_fast.data.records import read_records
    from r3v_fast.data.shapes import default_dataset

    test = read_records(default_dataset(seed=test_seed) / "test.jsonl")[0]
    return {_scene_key(r.question, r.meta) for r in test} | {_scene_key("", r.meta) for r in test}


def _stream(name: str, image_size: int, avoid: set, qtypes: Sequence[str] | None = None,
            captions: bool = False, render: bool = True) -> Iterator[_Item]:
    """Endless shapes-math items from a named seed stream, optionally of some question types only.

    Items whose key is in `avoid` are skipped and every key yielded joins it, so streams that
    share `avoid` never repeat an item, nor a held-out one. For `captions` the key is the scene
    alone (the question is not used).
    """
    rng = random.Random(name)  # str seeds are hashed (sha512): independent, reproducible streams
    index = 0
    while True:
        question, answer, meta = make_item(rng, image_size)
        if qtypes is not None and meta["qtype"] not in qtypes:
            continue
        key = _scene_key("" if captions else question, meta)
        if key in avoid:
            continue
        avoid.add(key)
        record = Record(id=f"{name}-{index:06d}", image=f"<memory:{name}/{index}>", question=question,
                        answer=str(answer), dataset="shapes-math", meta=meta)
        index += 1
        yield _Item(record, render_scene(meta["objects"], image_size) if render else None)


def tokenizer_corpus(seed: int = 0, n_items: int = 600) -> list[str]:
    """The tokenizer's training text: the prompt instructions and chat words, plus questions,
    worked solutions, captions and answer lines of `n_items` shapes-math items."""
    from r3v_fast.model.tiny import DEFAULT_TOKENIZER_TEXTS

    texts = list(DEFAULT_TOKENIZER_TEXTS)
    texts += [prompts.COT_INSTRUCTION, prompts.REFINE_INSTRUCTION, prompts.SELECT_INSTRUCTION,
              DIRECT_INSTRUCTION, CAPTION_PROMPT, "user\nassistant\n"]
    arithmetic = _arithmetic_stream(f"r3v-tiny-vlm/{seed}/tokenizer-arithmetic")
    texts += [ARITHMETIC_PROMPT.format(expression=next(arithmetic)) for _ in range(200)]
    texts += [f"Model's prediction {i}:" for i in range(1, 10)] + ["Model's prediction:"]
    stream = _stream(f"r3v-tiny-vlm/{seed}/tokenizer", 112, set(), render=False)
    for _ in range(n_items):
        record = next(stream).record
        texts += [record.question, template_cot(record), scene_caption(record.meta["objects"])]
    # Several copies of the fixed prompt text so that its words become single tokens.
    return texts + 20 * [prompts.COT_INSTRUCTION, DIRECT_INSTRUCTION, prompts.SELECT_INSTRUCTION,
                         prompts.REFINE_INSTRUCTION, CAPTION_PROMPT]


@dataclass
class _Example:
    prompt_ids: list[int]   # rendered chat prompt with the image tokens expanded
    target_ids: list[int]   # target tokens + end-of-turn
    image: object
    kind: str               # "caption" | "direct" | "cot" | "arithmetic" (image None)
    prompt_token_types: list[int] | None = None  # processor's mm_token_type_ids (1 = image), if any


class _Encoder:
    """Turns items into examples. Prompts go through the processor (which expands the image
    placeholder), targets through the plain tokenizer, then end-of-turn: the split the engine's
    trainer uses. Every image has the same size, so a prompt's ids depend on its text only and
    are cached by it (questions repeat a lot)."""

    def __init__(self, processor, end_of_turn: int):
        self.processor, self.end_of_turn, self.cache = processor, end_of_turn, {}
        self.token_types = False  # whether the processor returns mm_token_type_ids (set on first use)

    def arithmetic(self, line: str) -> _Example:
        expression, _ = line.split(" = ")
        text = prompts.render(self.processor, arithmetic_messages(expression))
        if text not in self.cache:
            encoded = self.processor.tokenizer(text, add_special_tokens=False)
            self.cache[text] = (list(map(int, encoded["input_ids"])), None)
        prompt_ids = self.cache[text][0]
        target_ids = self.processor.tokenizer(line, add_special_tokens=False)["input_ids"]
        return _Example(prompt_ids, target_ids + [self.end_of_turn], None, "arithmetic",
                        [0] * len(prompt_ids) if self.token_types else None)

    def __call__(self, item: _Item, kind: str) -> _Example:
        r = item.record
        if kind == "caption":
            messages, target = caption_messages(), scene_caption(r.meta["objects"])
        elif kind == "direct":
            messages, target = direct_messages(r), prompts.answer_line(r.answer)
        else:
            messages, target = prompts.cot_messages(r), template_cot(r)
        text = prompts.render(self.processor, messages)
        key = (text, item.image.size)
        if key not in self.cache:
            encoded = self.processor(text=[text], images=[item.image])
            # transformers >= 5.2x computes M-RoPE from the processor's token types; older
            # versions derive them from input_ids and return none.
            types = encoded.get("mm_token_type_ids")
            self.token_types = types is not None
            self.cache[key] = (list(map(int, encoded["input_ids"][0])),
                               None if types is None else list(map(int, types[0])))
        prompt_ids, types = self.cache[key]
        target_ids = self.processor.tokenizer(target, add_special_tokens=False)["input_ids"]
        return _Example(prompt_ids, target_ids + [self.end_of_turn], item.image, kind, types)


def _collate(batch: list[_Example], processor, pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 except on target tokens (HF shifts them itself)."""
    length = max(len(e.prompt_ids) + len(e.target_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad, dtype=torch.long)    # [B, L]
    labels = torch.full((len(batch), length), -100, dtype=torch.long)      # [B, L]
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)   # [B, L]
    token_types = torch.zeros((len(batch), length), dtype=torch.long)      # [B, L] 1 = image token
    for i, e in enumerate(batch):
        ids = e.prompt_ids + e.target_ids
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, len(e.prompt_ids):len(ids)] = torch.tensor(e.target_ids)
        attention_mask[i, :len(ids)] = 1
        if e.prompt_token_types is not None:
            token_types[i, :len(e.prompt_ids)] = torch.tensor(e.prompt_token_types)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with_image = [e.image for e in batch if e.image is not None]
    if with_image:  # the model scatters image features onto the image tokens, row by row
        images = processor.image_processor(images=with_image, return_tensors="pt")
        inputs.update(pixel_values=images["pixel_values"],        # [B_img * patches, C * t * p * p]
                      image_grid_thw=images["image_grid_thw"])    # [B_img, 3]
    if any(e.prompt_token_types is not None for e in batch):
        inputs["mm_token_type_ids"] = token_types
    return inputs


def _param_groups(model, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only; the vision encoder (patch embedding and
    blocks, not the merger) at lr * vision_lr_scale, frozen at 0.

    Why: at initialisation the random encoder's 28 px tokens already separate colour and shape
    almost perfectly (a linear probe reads both at ~100 %), while the full learning rate on it,
    before the language model has learnt to look, scrambled them (probe ~80 % after training).
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        encoder = ".visual." in f".{name}" and ".merger." not in name
        if encoder and cfg.vision_lr_scale == 0:
            param.requires_grad_(False)
            continue
        groups.setdefault((encoder, param.ndim >= 2 and "embed" not in name), []).append(param)
    return [{"params": params, "lr": cfg.lr * (cfg.vision_lr_scale if encoder else 1.0),
             "weight_decay": cfg.weight_decay if decay else 0.0}
            for (encoder, decay), params in sorted(groups.items())]


# -- pretraining ----------------------------------------------------------------------------------

def pretrain(out_dir, seed: int | None = None, *, config: PretrainConfig | None = None, log=print,
             **overrides) -> Path:
    """Build, train and save the tiny VLM into `out_dir`; returns the directory.

    `config` (default PretrainConfig()) with `seed` (if given) and any `overrides`
    (PretrainConfig field names) applied. Also writes `pretrain.json` (the configuration,
    losses and wall time).
    """
    cfg = replace(config or PretrainConfig(), **({} if seed is None else {"seed": seed}), **overrides)
    parts = (cfg.batch_caption, cfg.batch_direct, cfg.batch_cot, cfg.batch_arithmetic)
    if min(parts) < 0 or cfg.batch_size == 0 or cfg.batch_size == cfg.batch_arithmetic:
        raise ValueError(f"batch composition must be non-negative with at least one image example, got "
                         f"{parts} (captions, direct, CoT, arithmetic)")
    if cfg.batch_cot and cfg.n_cot_easy + cfg.n_cot_hard == 0:
        raise ValueError("batch_cot > 0 needs a CoT warm-up set (n_cot_easy + n_cot_hard > 0)")
    t_start = time.time()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            summary = _train(cfg, Path(out_dir), log)
    finally:
        torch.set_num_threads(previous_threads)
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    (Path(out_dir) / "pretrain.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"saved {out_dir} in {summary['wall_seconds']:.0f} s")
    return Path(out_dir)


def _train(cfg: PretrainConfig, out: Path, log) -> dict:
    from r3v_fast.model.loading import end_of_turn_id, pad_id
    from r3v_fast.model.tiny import make_tiny_qwen2vl

    model, processor = make_tiny_qwen2vl(
        seed=cfg.seed, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, vision_depth=cfg.vision_depth, vision_embed_dim=cfg.vision_embed_dim,
        vision_num_heads=cfg.vision_num_heads, vocab_size=cfg.vocab_size,
        min_pixels=min(56, cfg.vision_side) ** 2, max_pixels=cfg.vision_side ** 2,
        texts=tokenizer_corpus(cfg.seed))
    encode, pad = _Encoder(processor, end_of_turn_id(processor)), pad_id(processor)

    avoid = _held_out_keys(cfg.exclude_test_seed)
    base = f"r3v-tiny-vlm/{cfg.seed}"
    hard = tuple(t for t in QUESTION_TYPES if t not in EASY_TYPES)
    cot_set = [encode(item, "cot") for n, name, types in ((cfg.n_cot_easy, "cot-easy", EASY_TYPES),
                                                          (cfg.n_cot_hard, "cot-hard", hard))
               for item in itertools.islice(_stream(f"{base}/{name}", cfg.image_size, avoid, types), n)]
    captions = _stream(f"{base}/caption", cfg.image_size, avoid, captions=True)
    direct = _stream(f"{base}/direct", cfg.image_size, avoid)
    arithmetic = _arithmetic_stream(f"{base}/arithmetic")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny Qwen2-VL: {n_params / 1e6:.2f} M parameters, vocab {len(processor.tokenizer)}; "
        f"{cfg.steps} steps of {cfg.batch_caption} captions + {cfg.batch_direct} direct QA (fresh) + "
        f"{cfg.batch_arithmetic} arithmetic + {cfg.batch_cot} CoT from a warm-up set of {len(cot_set)}")

    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr)
    # Linear warm-up, then cosine decay to lr * min_lr_ratio (transformers' cosine_with_min_lr).
    scheduler = lr_schedule(optimizer, "cosine_with_min_lr", cfg.warmup_steps, cfg.steps,
                            min_lr_rate=cfg.min_lr_ratio)
    cot_rng, cot_order = random.Random(f"{base}/cot-order"), []
    history, window = [], []
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        batch = ([encode(next(captions), "caption") for _ in range(cfg.batch_caption)]
                 + [encode(next(direct), "direct") for _ in range(cfg.batch_direct)]
                 + [encode.arithmetic(next(arithmetic)) for _ in range(cfg.batch_arithmetic)])
        for _ in range(cfg.batch_cot):
            if not cot_order:  # next pass over the warm-up set, freshly shuffled
                cot_order = list(range(len(cot_set)))
                cot_rng.shuffle(cot_order)
            batch.append(cot_set[cot_order.pop()])
        # Plain HF loss: token mean of the cross-entropy over the unmasked (target) tokens.
        loss = model(**_collate(batch, processor, pad)).loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"pretraining diverged: loss {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "loss": round(sum(window) / len(window), 4)})
            log(f"step {step + 1}/{cfg.steps}  loss {history[-1]['loss']:.4f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {time.time() - t0:.0f} s")
            window.clear()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"config": asdict(cfg), "parameters": n_params, "train_seconds": round(time.time() - t0, 1),
            "loss_history": history}


# -- evaluation -----------------------------------------------------------------------------------

def evaluate_checkpoint(model_dir, records: Sequence[Record], *, k: int = 3, max_new_tokens: int = 48,
                        seed: int = 0, batch_size: int = 32, threads: int | None = 1) -> dict:
    """Per question type: direct-answer accuracy, CoT Pass@1 (greedy) and oracle@k (k samples at
    the public setting T 0.9 / top-p 0.95 / top-k 50), in percent; key "all" pools the types."""
    from r3v_fast.engine.evaluation import is_right
    from r3v_fast.engine.sampler import GREEDY, HFSampler, Request, SamplingParams
    from r3v_fast.model.loading import load_vlm

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model, processor = load_vlm(model_dir)
        sampler = HFSampler(model, processor, batch_size=batch_size, show_progress=False)
        direct = [Request(prompts.render(processor, direct_messages(r)), r.image) for r in records]
        cot = [Request(prompts.render(processor, prompts.cot_messages(r)), r.image) for r in records]
        direct_out = sampler.sample(direct, replace(GREEDY, max_new_tokens=8))
        greedy_out = sampler.sample(cot, replace(GREEDY, max_new_tokens=max_new_tokens))
        sampled_out = sampler.sample(cot, SamplingParams(k=k, max_new_tokens=max_new_tokens, seed=seed))
    finally:
        torch.set_num_threads(previous_threads)
    rows = defaultdict(lambda: defaultdict(list))
    for r, d, g, s in zip(records, direct_out, greedy_out, sampled_out):
        for qtype in (r.meta["qtype"], "all"):
            rows[qtype]["direct"].append(is_right(r, d[0]))
            rows[qtype]["pass@1"].append(is_right(r, g[0]))
            rows[qtype][f"oracle@{k}"].append(any(is_right(r, c) for c in s))
    order = [*QUESTION_TYPES, "all"]
    return {qtype: {"n": len(rows[qtype]["direct"]),
                    **{m: round(100 * sum(v) / len(v), 1) for m, v in rows[qtype].items()}}
            for qtype in order if qtype in rows}


def format_report(report: dict) -> str:
    metrics = [m for m in next(iter(report.values())) if m != "n"]
    lines = [f"{'type':<24}{'n':>5}" + "".join(f"{m:>10}" for m in metrics)]
    for qtype, row in report.items():
        lines.append(f"{qtype:<24}{row['n']:>5}" + "".join(f"{row[m]:>10.1f}" for m in metrics))
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = new_parser("python -m r3v_fast.pretrain", __doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--evaluate", action="store_true",
                        help="afterwards, report per-type accuracy on the default test split")
    names = add_options(parser, [PretrainConfig])
    args = parser.parse_args(argv)
    config = PretrainConfig(**{name: getattr(args, name) for name in names})
    try:
        check_ranges(config)
        if config.batch_size < 1:
            raise UsageError("--batch-caption, --batch-direct, --batch-cot and --batch-arithmetic are all 0: "
                             "a step needs at least one item")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = pretrain(args.out, config=config)
    if args.evaluate:
        from r3v_fast.data.records import read_records
        from r3v_fast.data.shapes import default_dataset

        test, _ = read_records(default_dataset() / "test.jsonl")
        print(format_report(evaluate_checkpoint(out, test)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
