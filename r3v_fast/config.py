"""Run configuration: one frozen dataclass, named presets, CLI flags that map 1:1 onto fields.

Resolution order: preset < JSON config file (``--config``) < command-line flags. The resolved
configuration is written to ``<run_dir>/config.json``, which ``--resume`` reads back.

Presets:
- ``default``: the embedded default — shapes-math with the project's tiny VLM, 3 iterations,
  sized to finish on a laptop CPU.
- ``smoke``: a minutes-long sanity run (few questions, 1 iteration).
- ``public``: the public R³V settings for a real VLM (LoRA r 64 / α 16, LR 3e-5, 3 epochs,
  global batch 64, max length 2048, K = 3 at temperature 0.9, top-p 0.95, top-k 50, 384 new
  tokens); give ``--model`` and ``--data``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunConfig:
    # what to run on
    model: str | None = None          # local HF VLM directory; None = the embedded tiny VLM
    data: str | None = None           # training questions; None = the embedded shapes-math split
    test_data: str | None = None      # held-out questions for evaluation
    warmup_data: str | None = None    # warm-up set kept in every mix (direct QA / worked CoT)
    data_format: str = "auto"         # auto | jsonl | mmsi | chartqa | tabmwp | clevr-math | geoqa | m3cot
    image_root: str | None = None
    shapes_train: int = 600           # size of the embedded shapes-math train split (no --data)
    shapes_test: int = 200            # size of its test split
    max_train_questions: int | None = None
    max_test_questions: int | None = None
    trust_remote_code: bool = False
    # where to write
    run_dir: str | None = None        # default: runs/<timestamp>
    resume: bool = False
    # the R³V loop
    method: str = "r3v"               # r3v | star (SFT on positives only)
    iterations: int = 3
    init: str = "base"                # base | previous: which weights each iteration trains from
    eval_base: bool = True            # evaluate the starting model as iteration 0
    # sampling (bootstrap)
    sampler: str = "shared"           # shared (one prefix KV per question) | hf (plain generate)
    k: int = 3
    temperature: float = 0.9
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = 384
    sample_batch_size: int = 16
    chunk_size: int = 64              # questions per pool shard (the unit of resume)
    # task sets
    n_candidates: int = 3
    selects_per_question: int = 2
    include_warmup: bool = True
    # training
    epochs: int = 3
    lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 64
    max_tokens: int = 4096
    max_length: int = 2048
    packing: str = "tree"
    loss_mix: str = "official"
    weight_sft: float = 1.0
    weight_refine: float = 1.0
    weight_select: float = 1.0
    weight_warmup: float = 1.0
    lora_r: int = 64                  # 0 = full fine-tuning
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    save_every: int = 50
    # evaluation
    eval_ks: str = "1,3"
    eval_max_new_tokens: int | None = None   # None = max_new_tokens
    # misc
    seed: int = 0
    bf16: bool | None = None          # None = bf16 on CUDA, fp32 on CPU
    progress: bool = True

    def eval_k_list(self) -> list[int]:
        ks = sorted({int(k) for k in str(self.eval_ks).split(",") if k.strip()})
        if not ks or ks[0] < 1:
            raise ValueError(f"--eval-ks must list positive integers, got {self.eval_ks!r}")
        return ks


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: full fine-tuning of the 1.1 M-parameter model, each iteration
    # continuing from the previous one (init="previous"), on 2000 shapes-math questions.
    "default": dict(iterations=3, k=3, max_new_tokens=48, eval_ks="1,3", epochs=3, lr=3e-4,
                    init="previous", shapes_train=2000, batch_size=32, max_tokens=4096, max_length=512,
                    lora_r=0, warmup_steps=5, sample_batch_size=32, chunk_size=100, eval_max_new_tokens=48),
    "smoke": dict(iterations=1, k=3, max_new_tokens=24, eval_ks="1,3", epochs=1, lr=1e-3, batch_size=16,
                  max_tokens=2048, max_length=384, lora_r=0, warmup_steps=1, max_train_questions=24,
                  max_test_questions=12, sample_batch_size=12, chunk_size=8),
    "public": dict(),
}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_parser(field: dataclasses.Field):
    kind = str(field.type)
    if "bool" in kind:
        return _parse_bool
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="named starting configuration (default: %(default)s)")
    parser.add_argument("--config", help="JSON file of field: value overrides, applied after the preset")
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        extra = dict(nargs="?", const=True) if _field_parser(f) is _parse_bool else {}
        parser.add_argument(flag, dest=f.name, type=_field_parser(f), default=None,
                            help=f"(default: {f.default!r})", **extra)


def resolve(args: argparse.Namespace) -> RunConfig:
    """preset < config file < explicit flags."""
    values: dict[str, Any] = dict(PRESETS[args.preset])
    if args.config:
        path = Path(args.config)
        try:
            loaded = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"error: cannot read config file {path}: {err}")
        unknown = set(loaded) - {f.name for f in fields(RunConfig)}
        if unknown:
            raise SystemExit(f"error: {path}: unknown config fields {sorted(unknown)}")
        values.update(loaded)
    for f in fields(RunConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return RunConfig(**values)


def to_json(cfg: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def from_json(text: str) -> RunConfig:
    return RunConfig(**json.loads(text))
