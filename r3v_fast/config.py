"""Every setting of r3v_fast, defined once: option groups, the run configuration, presets, flags.

Each option is one dataclass field with its type, default and a one-line help text
(:func:`option`). Fields are grouped by the part of the engine that reads them:

    ModelOptions     which model and how to hold it         (r3v_fast.model)
    DataOptions      training / test / warm-up questions     (r3v_fast.data)
    RunOptions       run directory, resume, seed, progress    (r3v_fast.engine.rundir)
    LoopOptions      iterations and what each trains from     (r3v_fast.engine.loop)
    SamplingOptions  bootstrap and evaluation sampling        (r3v_fast.engine.sampler)
    TaskOptions      building SFT / refine / select sets      (r3v_fast.engine.tasks)
    TrainOptions     the optimizer, the loss, packing, loading (r3v_fast.engine.trainer)
    EvalOptions      held-out evaluation                      (r3v_fast.engine.evaluation)

:class:`RunConfig` is composed of one instance of each group; the engine hands each part its
own group (``cfg.train`` to the trainer, ``cfg.tasks`` to the task builder), so nothing is
copied between config types. Field names are unique across groups, which gives every field a
flat flag (``lr`` -> ``--lr``) and lets a JSON config file be flat or nested by group.

Flags are generated from the fields by :func:`add_options`, also for ``python -m
r3v_fast.evaluate`` and ``python -m r3v_fast.pretrain`` (each takes the subset it uses). It is
a small generator of our own rather than ``transformers.HfArgumentParser`` or tyro because
entry points need field *subsets* of shared groups, ``--help`` must show the chosen preset's
values, boolean flags take ``--x``, ``--x false`` and ``--no-x`` alike, and tyro is one more
dependency. Types come from the annotations: ``Literal[...]`` lists the choices, ``X | None``
also accepts ``none``.

Resolution order: field defaults < preset (``--preset``) < JSON file (``--config``) < flags.
The resolved configuration is written to ``<run_dir>/config.json``, which ``--resume`` reads.

Presets:
- ``default``: the embedded run, shapes-math with the shipped tiny VLM, sized for a laptop CPU;
- ``smoke``: a minutes-long sanity run (few questions, 1 iteration);
- ``public``: the public R³V setting for a real VLM (the field defaults: LoRA r 64 / α 16,
  LR 3e-5 constant after warm-up, 3 epochs, 64 examples per step, max length 2048, K = 3 at
  temperature 0.9, top-p 0.95, top-k 50, 384 new tokens; plus the warm-up round as iteration
  0); give ``--model``, ``--data`` and ``--warmup-data``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import textwrap
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Sequence

from r3v_fast.data.loaders import FORMATS

__all__ = ["UsageError", "option", "ModelOptions", "DataOptions", "RunOptions", "LoopOptions",
           "SamplingOptions", "TaskOptions", "TrainOptions", "EvalOptions", "RunConfig", "GROUPS",
           "PRESETS", "RESUMABLE", "add_options", "parse_run_config", "resolve_bf16", "LR_SCHEDULERS"]


class UsageError(Exception):
    """Bad configuration or input, found before the work it concerns starts (exit code 2)."""


def option(default: Any, help: str, *, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None, below: float | None = None, on_resume: bool = False) -> Any:
    """A dataclass field with a one-line help text (shown by ``--help``).

    Numeric fields give their range (``at_least`` / ``above`` / ``at_most`` / ``below``), checked
    by :meth:`RunConfig.validate` whatever the value came from (preset, file, flag, saved run).
    ``on_resume``: the field may change when a run is resumed (``--resume --lr 1e-5``); it only
    changes how work not yet done is carried out (speed, memory, the optimizer, how long the run
    goes on, what is evaluated), never what finished work means. Every other field is fixed
    once a run has started (:meth:`RunConfig.resumed_with`).
    """
    bounds = {k: v for k, v in dict(at_least=at_least, above=above, at_most=at_most, below=below).items()
              if v is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds, "on_resume": on_resume})


def check_ranges(options: Any) -> None:
    """Check every field of an option dataclass against its type and its declared range;
    UsageError naming the flag."""
    for f, kind in _option_fields(type(options)):
        value = getattr(options, f.name)
        coerce(f.name, value, kind)
        problem = range_error(f.name, value, bounds_of(f))
        if problem:
            raise UsageError(problem)


def bounds_of(f: dataclasses.Field) -> dict[str, float]:
    """The range an option field declares ({} for non-numeric fields)."""
    return dict(f.metadata.get("bounds", {}))


def range_error(name: str, value: Any, bounds: dict[str, float]) -> str | None:
    """Why ``value`` is outside ``bounds`` (a sentence naming the flag), or None if it is inside.
    NaN and infinities are refused for every float field: no setting means anything at NaN."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{flag(name)} must be a finite number, got {value}"
    for kind, limit, ok in (("at least", bounds.get("at_least"), lambda v, l: v >= l),
                            ("above", bounds.get("above"), lambda v, l: v > l),
                            ("at most", bounds.get("at_most"), lambda v, l: v <= l),
                            ("below", bounds.get("below"), lambda v, l: v < l)):
        if limit is not None and not ok(value, limit):
            return f"{flag(name)} must be {kind} {limit:g}, got {value:g}"
    return None


# accelerate trackers offered by --report-to (each needs its package installed).
TRACKERS = ("tensorboard", "trackio", "wandb")
# transformers.get_scheduler names offered by --lr-scheduler.
LR_SCHEDULERS = ("constant_with_warmup", "cosine", "linear", "constant")


# ------------------------------------------------------------------------------ option groups
@dataclass(frozen=True)
class ModelOptions:
    title: ClassVar[str] = "model"
    model: str | None = option(None, "local Hugging Face VLM directory (Qwen2-VL, Qwen2.5-VL, LLaVA); "
                                     "none = the embedded tiny VLM")
    trust_remote_code: bool = option(False, "run model code that ships inside the model directory")
    bf16: bool | None = option(None, "bf16 weights and autocast; none = bf16 on CUDA, fp32 on CPU")


@dataclass(frozen=True)
class DataOptions:
    title: ClassVar[str] = "data"
    data: tuple[str, ...] = option((), "training question files or glob patterns; none = the embedded "
                                       "shapes-math split")
    test_data: tuple[str, ...] = option((), "held-out question files or glob patterns for evaluation")
    warmup_data: tuple[str, ...] = option((), "warm-up files or glob patterns, kept in every training mix "
                                               "(direct-answer QA and worked CoT, e.g. sft_qa.json *_sft_gpt.json)")
    data_format: Literal[FORMATS] = option("auto", "format of the data files; auto detects it per file")
    dataset: str | None = option(None, "judge for every data file (chartqa, tabmwp, clevr-math, geoqa, m3cot, "
                                       "...); none = from the file's or its folder's name")
    image_root: str | None = option(None, "folder that image paths are relative to; none = the format's default")
    warmup_image_root: str | None = option(None, "folder the warm-up files' image paths are relative to; "
                                                 "none = --image-root")
    shapes_train: int = option(600, "questions in the embedded shapes-math train split (no --data)", at_least=1)
    shapes_test: int = option(200, "questions in the embedded shapes-math test split (no --test-data)", at_least=1)
    max_train_questions: int | None = option(None, "use at most this many training questions; none = all", at_least=1)
    max_test_questions: int | None = option(None, "evaluate on at most this many questions; none = all", at_least=1)


@dataclass(frozen=True)
class RunOptions:
    title: ClassVar[str] = "run"
    run_dir: str | None = option(None, "run directory; none = runs/<date-time> (with --resume: the latest run)")
    resume: bool = option(False, "continue the run in --run-dir with its saved configuration (the settings "
                                 "that may change with it are listed at the end of --help)")
    seed: int = option(0, "seed of sampling, task building and batch order", at_least=0)
    progress: bool = option(True, "show progress bars", on_resume=True)
    report_to: tuple[Literal[TRACKERS], ...] = option(
        (), "experiment trackers (accelerate's log_with) that receive per-step losses, learning rate, "
            "grad norm, tokens/s and every iteration's metrics; none by default", on_resume=True)


@dataclass(frozen=True)
class LoopOptions:
    title: ClassVar[str] = "R3V loop"
    iterations: int = option(3, "R3V iterations: bootstrap, build, train, evaluate", at_least=1, on_resume=True)
    init: Literal["base", "previous"] = option(
        "base", "weights each iteration trains from: the base model (public R3V) or the previous iteration's")
    eval_base: bool = option(True, "evaluate the starting model (iteration 0, or -1 before a warm-up round)",
                             on_resume=True)
    warmup_round: bool = option(False, "iteration 0 trains on the warm-up data only, and iteration 1 samples "
                                       "from that model (the public pipeline)")
    chunk_size: int = option(64, "questions per sample-pool shard (the unit of resume and of sharding)", at_least=1)


@dataclass(frozen=True)
class SamplingOptions:
    title: ClassVar[str] = "sampling"
    sampler: Literal["shared", "shared-grouped", "hf"] = option(
        "shared", "shared: continuous batching over one paged prefix KV per question; shared-grouped: the "
                  "same per group of questions, no refill; hf: plain generate with K copies")
    k: int = option(3, "solutions sampled per training question in each bootstrap", at_least=1)
    temperature: float = option(0.9, "sampling temperature (0 = greedy)", at_least=0)
    top_p: float = option(0.95, "nucleus sampling: keep the smallest token set of this probability", above=0, at_most=1)
    top_k: int = option(50, "keep only the k most likely tokens (0 = no limit)", at_least=0)
    max_new_tokens: int = option(384, "longest sampled solution, in tokens", at_least=1)
    sample_batch_size: int = option(16, "questions sampled together (shared: questions in flight)",
                                    at_least=1, on_resume=True)
    sample_slots: int | None = option(None, "shared: decode slots (branches stepped together); "
                                            "none = sample-batch-size x branches per question",
                                        at_least=1, on_resume=True)
    kv_block_size: int = option(16, "shared: tokens per KV-cache block", at_least=1, on_resume=True)
    kv_budget_tokens: int | None = option(None, "shared: KV pool size in tokens; none = every slot's full "
                                                "budget plus room for prompts", at_least=1, on_resume=True)
    max_prefill_tokens: int = option(8192, "shared: prompt tokens per prefill forward", at_least=1, on_resume=True)
    sync_every: int = option(8, "shared: decode steps between host syncs (finish checks, admissions)",
                             at_least=1, on_resume=True)


@dataclass(frozen=True)
class TaskOptions:
    title: ClassVar[str] = "task sets"
    method: Literal["r3v", "star"] = option(
        "r3v", "r3v: SFT + self-refine + self-select; star: SFT on correct samples only")
    n_candidates: int = option(3, "candidates shown in a self-select example", at_least=2)
    selects_per_question: int = option(2, "self-select examples per question at most", at_least=0)
    include_warmup: bool = option(True, "keep the warm-up set in every training mix")

    @property
    def include_refine(self) -> bool:
        return self.method == "r3v"

    @property
    def include_select(self) -> bool:
        return self.method == "r3v"


@dataclass(frozen=True)
class TrainOptions:
    title: ClassVar[str] = "training"
    epochs: int = option(3, "passes over each iteration's training mix", at_least=1)
    lr: float = option(3e-5, "peak learning rate", above=0, on_resume=True)
    lr_scheduler: Literal[LR_SCHEDULERS] = option(
        "constant_with_warmup", "learning-rate schedule (transformers.get_scheduler name)", on_resume=True)
    warmup_steps: int = option(10, "optimizer steps of linear learning-rate warm-up", at_least=0, on_resume=True)
    weight_decay: float = option(0.0, "AdamW weight decay", at_least=0, on_resume=True)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 = no clipping)", at_least=0, on_resume=True)
    batch_size: int = option(64, "examples per optimizer step (whole question groups)", at_least=1)
    max_tokens: int = option(4096, "tokens per micro-batch (gradient accumulation over micro-batches)",
                             at_least=1, on_resume=True)
    max_length: int = option(2048, "longest example in tokens; longer ones are dropped and counted", at_least=1)
    packing: Literal["tree", "none"] = option(
        "tree", "tree: one token trie per question shares its image + question prefix; none: padded rows",
        on_resume=True)
    loss: Literal["fused", "naive"] = option(
        "fused", "fused: LM head, log-softmax and target gather in one op, logits never stored; "
                 "naive: full logits (the baseline)", on_resume=True)
    data_path: Literal["stream", "eager"] = option(
        "stream", "stream: plan steps from token counts, load each step's images in DataLoader workers; "
                  "eager: process every example's image up front and keep it (the baseline)", on_resume=True)
    num_workers: int | None = option(
        None, "DataLoader worker processes loading upcoming steps (--data-path stream); 0 = in the training "
              "process; none = min(4, CPU cores per rank - 1)", at_least=0, on_resume=True)
    loss_mix: Literal["official", "per-task"] = option(
        "official", "official: token mean over all targets; per-task: weighted sum of per-task token means")
    weight_sft: float = option(1.0, "per-task loss weight of SFT examples", at_least=0)
    weight_refine: float = option(1.0, "per-task loss weight of self-refine examples", at_least=0)
    weight_select: float = option(1.0, "per-task loss weight of self-select examples", at_least=0)
    weight_warmup: float = option(1.0, "per-task loss weight of warm-up examples", at_least=0)
    lora_r: int = option(64, "LoRA rank of the language model's linear layers (0 = full fine-tuning)", at_least=0)
    lora_alpha: int = option(16, "LoRA alpha", at_least=1)
    lora_dropout: float = option(0.05, "LoRA dropout", at_least=0, below=1)
    save_every: int = option(50, "optimizer steps between saved training states (0 = only on interrupt)",
                             at_least=0, on_resume=True)
    skip_nonfinite: int = option(0, "optimizer steps with a non-finite loss or gradient to skip (no update, each "
                                    "logged with its questions) before training stops as diverged",
                                 at_least=0, on_resume=True)


@dataclass(frozen=True)
class EvalOptions:
    title: ClassVar[str] = "evaluation"
    eval_ks: str = option("1,3", "comma-separated K values for maj@K, oracle@K and select@K", on_resume=True)
    eval_max_new_tokens: int | None = option(None, "longest evaluated solution in tokens; none = --max-new-tokens",
                                             at_least=1, on_resume=True)
    select_max_new_tokens: int | None = option(None, "longest reply to the select prompt at test time; "
                                                     "none = the evaluation length", at_least=1, on_resume=True)

    def k_list(self) -> list[int]:
        try:
            ks = sorted({int(k) for k in str(self.eval_ks).split(",") if k.strip()})
        except ValueError:
            ks = []
        if not ks or ks[0] < 1:
            raise UsageError(f"--eval-ks must list positive integers, got {self.eval_ks!r}")
        return ks


GROUPS: tuple[type, ...] = (ModelOptions, DataOptions, RunOptions, LoopOptions, SamplingOptions,
                            TaskOptions, TrainOptions, EvalOptions)
_GROUP_ATTRS = ("model", "data", "run", "loop", "sampling", "tasks", "train", "eval")


@functools.cache
def _option_fields(group: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved annotation) pairs of an option group (postponed annotations resolved)."""
    hints = typing.get_type_hints(group)
    return tuple((f, hints[f.name]) for f in fields(group))


def option_types(group: type) -> dict[str, Any]:
    """field name -> resolved annotation (strings under postponed evaluation are resolved)."""
    return {f.name: t for f, t in _option_fields(group)}


# ------------------------------------------------------------------------------ the run config
@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of a run: one instance of each option group."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    run: RunOptions = field(default_factory=RunOptions)
    loop: LoopOptions = field(default_factory=LoopOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    tasks: TaskOptions = field(default_factory=TaskOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> RunConfig:
        """Build from {field name: value}; values are checked against the field types."""
        unknown = sorted(set(values) - set(FIELD_GROUP))
        if unknown:
            raise UsageError(f"unknown configuration fields {unknown}")
        parts = {}
        for attr, group in zip(_GROUP_ATTRS, GROUPS):
            types = option_types(group)
            parts[attr] = group(**{name: coerce(name, values[name], types[name])
                                   for name in types if name in values})
        return cls(**parts)

    def flat(self) -> dict[str, Any]:
        return {name: value for attr in _GROUP_ATTRS
                for name, value in dataclasses.asdict(getattr(self, attr)).items()}

    def replace(self, **changes) -> RunConfig:
        """A copy with some fields (flat names) changed."""
        return RunConfig.from_flat({**self.flat(), **changes})

    def to_json(self) -> str:
        return json.dumps({attr: dataclasses.asdict(getattr(self, attr)) for attr in _GROUP_ATTRS},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_flat(flatten_json(json.loads(text)))

    def resumed_with(self, given: dict[str, Any]) -> tuple[RunConfig, dict[str, tuple[Any, Any]]]:
        """This (saved) configuration with the settings ``given`` on the ``--resume`` command line
        applied: a field declared ``on_resume`` takes the new value; any other field must keep
        its recorded value (giving it again unchanged is fine), else UsageError naming the flag
        and the recorded value. Returns the configuration and the changes {name: (old, new)}.
        ``run_dir`` and ``resume`` only locate the run and are not compared."""
        saved = self.flat()
        changes: dict[str, tuple[Any, Any]] = {}
        for name, value in given.items():
            if name in ("run_dir", "resume") or value == saved[name]:
                continue
            if not FIELD_META[name].get("on_resume"):
                raise UsageError(
                    f"{flag(name)} {_show(value)}: this run was started with {flag(name)} {_show(saved[name])}, "
                    "and changing it on --resume would mix incompatible work; start a new run with "
                    "another --run-dir (settings that can change on --resume: "
                    f"{', '.join(flag(n) for n in RESUMABLE)})")
            changes[name] = (saved[name], value)
        resumed = self.replace(**{name: new for name, (_, new) in changes.items()}) if changes else self
        return resumed, changes

    def validate(self) -> RunConfig:
        """Check every field's type, choices and range (the field's declared bounds, finite
        floats) and the cross-field rules; raise UsageError naming the flag. Returns self."""
        for attr in _GROUP_ATTRS:
            check_ranges(getattr(self, attr))
        # A micro-batch must hold the longest example training keeps, or packing fails mid-run.
        if self.train.max_tokens < self.train.max_length:
            raise UsageError(f"--max-tokens ({self.train.max_tokens}) must be at least --max-length "
                             f"({self.train.max_length}): a micro-batch must hold the longest example kept")
        self.eval.k_list()
        return self


FIELD_GROUP: dict[str, type] = {}
for _group in GROUPS:
    for _f in fields(_group):
        if _f.name in FIELD_GROUP:
            raise TypeError(f"option {_f.name!r} is defined in both {FIELD_GROUP[_f.name].__name__} "
                            f"and {_group.__name__}: flags must be unique")
        FIELD_GROUP[_f.name] = _group


FIELD_META: dict[str, dict[str, Any]] = {f.name: dict(f.metadata) for g in GROUPS for f in fields(g)}
# The settings --resume may change (declared with on_resume=True at their fields).
RESUMABLE: tuple[str, ...] = tuple(name for name, meta in FIELD_META.items() if meta.get("on_resume"))


def _show(value: Any) -> str:
    """A value as it would be written on the command line."""
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) if value else "(none)"
    return "none" if value is None else str(value)


def flatten_json(loaded: Any) -> dict[str, Any]:
    """A JSON config, flat ({"lr": 1e-4}) or nested by group ({"train": {"lr": 1e-4}}), as flat."""
    if not isinstance(loaded, dict):
        raise UsageError("a configuration file must hold a JSON object")
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in _GROUP_ATTRS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: full fine-tuning of the 1.1 M-parameter model, each iteration
    # continuing from the previous one (init="previous"), on 2000 shapes-math questions.
    "default": dict(iterations=3, k=3, max_new_tokens=48, eval_ks="1,3", epochs=3, lr=3e-4,
                    init="previous", shapes_train=2000, batch_size=32, max_tokens=4096, max_length=512,
                    lora_r=0, warmup_steps=5, sample_batch_size=32, chunk_size=100, eval_max_new_tokens=48),
    "smoke": dict(iterations=1, k=3, max_new_tokens=24, eval_ks="1,3", epochs=1, lr=1e-3, batch_size=16,
                  max_tokens=2048, max_length=384, lora_r=0, warmup_steps=1, max_train_questions=24,
                  max_test_questions=12, sample_batch_size=12, chunk_size=8),
    "public": dict(warmup_round=True),
}


def resolve_bf16(bf16: bool | None) -> bool:
    """The bf16 choice of every entry point: as asked, or on exactly when CUDA is available."""
    if bf16 is not None:
        return bool(bf16)
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------ values and flags
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _unwrap_optional(kind) -> tuple[Any, bool]:
    args = typing.get_args(kind)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return kind, False


def coerce(name: str, value: Any, kind) -> Any:
    """``value`` (from JSON or the command line) as the field's type; UsageError otherwise."""
    base, optional = _unwrap_optional(kind)
    if typing.get_origin(base) is tuple:   # tuple[str, ...]: a list in JSON, several words on the command line
        item = typing.get_args(base)[0]
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)):
            raise UsageError(f"{flag(name)}: expected a list, got {value!r}")
        return tuple(coerce(name, v, item) for v in values)
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise UsageError(f"{flag(name)} cannot be none")
    try:
        if typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(map(str, choices))}; got {value!r}")
            return value
        if base is bool:
            return parse_bool(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"expected a string, got {value!r}")
            return str(value)
    except ValueError as err:
        raise UsageError(f"{flag(name)}: {err}") from None
    raise TypeError(f"option {name!r}: unsupported type {kind!r}")


def _choices(kind) -> tuple | None:
    base, _ = _unwrap_optional(kind)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def add_options(parser: argparse.ArgumentParser, groups: Sequence[type], *,
                defaults: dict[str, Any] | None = None, only: Iterable[str] | None = None,
                suppress_defaults: bool = False) -> list[str]:
    """Add one flag per field of ``groups`` (or of the names in ``only``), one argument group per
    option group; ``defaults`` (field name -> value) replace the field defaults, so that
    ``--help`` shows what a bare run would use. With ``suppress_defaults`` a flag that is not
    given leaves no attribute, so the namespace holds exactly what the user typed. Returns the
    field names added."""
    defaults = defaults or {}
    wanted = None if only is None else set(only)
    added: list[str] = []
    for group in groups:
        section = parser.add_argument_group(getattr(group, "title", group.__name__))
        for f, kind in _option_fields(group):
            if wanted is not None and f.name not in wanted:
                continue
            help_text = f.metadata.get("help")
            if not help_text:
                raise TypeError(f"option {group.__name__}.{f.name} has no help text")
            default = argparse.SUPPRESS if suppress_defaults else defaults.get(f.name, f.default)
            choices = _choices(kind)
            base, optional = _unwrap_optional(kind)

            def convert(text, name=f.name, kind=kind):
                try:
                    return coerce(name, text, kind)
                except UsageError as err:
                    raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

            convert.__name__ = getattr(base, "__name__", "value")   # argparse's error messages
            kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=help_text, type=convert)
            if choices:
                kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
            elif base is not bool:
                kwargs["metavar"] = base.__name__.upper() + ("|none" if optional else "")
            if base is bool:
                kwargs.update(nargs="?", const=True, metavar="BOOL")
            if typing.get_origin(base) is tuple:   # --flag A B C (an empty list: the flag alone)
                item = typing.get_args(base)[0]
                item_choices = _choices(item)
                kwargs.update(nargs="*", metavar=("{" + ",".join(item_choices) + "}") if item_choices
                              else item.__name__.upper(),
                              type=lambda text, name=f.name, item=item: convert(text, name, item))
            section.add_argument(flag(f.name), **kwargs)
            if base is bool:
                section.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const",
                                     const=False, help=argparse.SUPPRESS)
            added.append(f.name)
    if wanted is not None and wanted - set(added):
        raise TypeError(f"unknown options {sorted(wanted - set(added))}")
    return added


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help line; the description keeps its line breaks."""


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The flat {field: value} of a JSON config file; UsageError if unreadable or unknown."""
    path = Path(path)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read config file {path}: {err}") from None
    try:
        values = flatten_json(loaded)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from None
    unknown = sorted(set(values) - set(FIELD_GROUP))
    if unknown:
        raise UsageError(f"{path}: unknown config fields {unknown}")
    try:
        return {name: coerce(name, value, option_types(FIELD_GROUP[name])[name]) for name, value in values.items()}
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from None


def preset_and_file_values(argv: Sequence[str] | None, *, default_preset: str = "default",
                           allowed: Iterable[str] | None = None) -> tuple[str, dict[str, Any]]:
    """First pass over the command line: the preset's and the config file's values, merged."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=default_preset, choices=sorted(PRESETS))
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    values = dict(PRESETS[known.preset])
    if known.config:
        values.update(load_config_file(known.config))
    if allowed is not None:
        values = {k: v for k, v in values.items() if k in set(allowed)}
    return known.preset, values


def add_preset_flags(parser: argparse.ArgumentParser, preset: str) -> None:
    parser.add_argument("--preset", default=preset, choices=sorted(PRESETS),
                        help="named starting configuration; --help shows its values")
    parser.add_argument("--config", help="JSON file of settings (flat, or nested by group), "
                                         "applied after the preset; flags win over it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON and exit")


def parse_run_config(argv: Sequence[str] | None, *, prog: str = "python -m r3v_fast.train",
                     description: str = "") -> tuple[RunConfig, argparse.Namespace]:
    """The run configuration from the command line (preset < --config < flags), and the
    namespace (for ``print_config``). ``namespace.given`` holds the settings the user gave
    explicitly, by flag or in the --config file ({field: value}; what ``--resume`` compares
    with the saved run), and ``namespace.preset_given`` whether --preset was typed.
    UsageError for a bad config file."""
    preset, values = preset_and_file_values(argv)
    parser = new_parser(prog, description)
    parser.epilog = textwrap.fill(
        "With --resume the run's saved configuration is used, and only these settings may change (each "
        "change is recorded in the run directory): " + " ".join(flag(name) for name in RESUMABLE)
        + ". Any other setting must keep its recorded value.", width=100, break_on_hyphens=False)
    add_preset_flags(parser, preset)
    add_options(parser, GROUPS, defaults=values)
    args = parser.parse_args(argv)
    cfg = RunConfig.from_flat({name: getattr(args, name) for name in FIELD_GROUP})

    typed = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    typed.add_argument("--preset")
    typed.add_argument("--config")
    typed.add_argument("--print-config", action="store_true")
    add_options(typed, GROUPS, suppress_defaults=True)
    explicit = vars(typed.parse_args(argv))
    args.preset_given = "preset" in explicit
    file_values = load_config_file(explicit["config"]) if "config" in explicit else {}
    args.given = {**file_values, **{name: value for name, value in explicit.items() if name in FIELD_GROUP}}
    return cfg, args
