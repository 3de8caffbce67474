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
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Sequence

from r3v_fast.data.loaders import FORMATS

__all__ = ["UsageError", "option", "ModelOptions", "DataOptions", "RunOptions", "LoopOptions",
           "SamplingOptions", "TaskOptions", "TrainOptions", "EvalOptions", "RunConfig", "GROUPS",
           "PRESETS", "add_options", "parse_run_config", "resolve_bf16", "LR_SCHEDULERS"]


class UsageError(Exception):
    """Bad configuration or input, found before the work it concerns starts (exit code 2)."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a one-line help text (shown by ``--help``)."""
    return field(default=default, metadata={"help": help})


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
    shapes_train: int = option(600, "questions in the embedded shapes-math train split (no --data)")
    shapes_test: int = option(200, "questions in the embedded shapes-math test split (no --test-data)")
    max_train_questions: int | None = option(None, "use at most this many training questions; none = all")
    max_test_questions: int | None = option(None, "evaluate on at most this many questions; none = all")


@dataclass(frozen=True)
class RunOptions:
    title: ClassVar[str] = "run"
    run_dir: str | None = option(None, "run directory; none = runs/<date-time> (with --resume: the latest run)")
    resume: bool = option(False, "continue the run in --run-dir with its saved configuration")
    seed: int = option(0, "seed of sampling, task building and batch order")
    progress: bool = option(True, "show progress bars")
    report_to: tuple[Literal[TRACKERS], ...] = option(
        (), "experiment trackers (accelerate's log_with) that receive per-step losses, learning rate, "
            "grad norm, tokens/s and every iteration's metrics; none by default")


@dataclass(frozen=True)
class LoopOptions:
    title: ClassVar[str] = "R3V loop"
    iterations: int = option(3, "R3V iterations: bootstrap, build, train, evaluate")
    init: Literal["base", "previous"] = option(
        "base", "weights each iteration trains from: the base model (public R3V) or the previous iteration's")
    eval_base: bool = option(True, "evaluate the starting model (iteration 0, or -1 before a warm-up round)")
    warmup_round: bool = option(False, "iteration 0 trains on the warm-up data only, and iteration 1 samples "
                                       "from that model (the public pipeline)")
    chunk_size: int = option(64, "questions per sample-pool shard (the unit of resume and of sharding)")


@dataclass(frozen=True)
class SamplingOptions:
    title: ClassVar[str] = "sampling"
    sampler: Literal["shared", "shared-grouped", "hf"] = option(
        "shared", "shared: continuous batching over one paged prefix KV per question; shared-grouped: the "
                  "same per group of questions, no refill; hf: plain generate with K copies")
    k: int = option(3, "solutions sampled per training question in each bootstrap")
    temperature: float = option(0.9, "sampling temperature (0 = greedy)")
    top_p: float = option(0.95, "nucleus sampling: keep the smallest token set of this probability")
    top_k: int = option(50, "keep only the k most likely tokens (0 = no limit)")
    max_new_tokens: int = option(384, "longest sampled solution, in tokens")
    sample_batch_size: int = option(16, "questions sampled together (shared: questions in flight)")
    sample_slots: int | None = option(None, "shared: decode slots (branches stepped together); "
                                            "none = sample-batch-size x branches per question")
    kv_block_size: int = option(16, "shared: tokens per KV-cache block")
    kv_budget_tokens: int | None = option(None, "shared: KV pool size in tokens; none = every slot's full "
                                                "budget plus room for prompts")
    max_prefill_tokens: int = option(8192, "shared: prompt tokens per prefill forward")
    sync_every: int = option(8, "shared: decode steps between host syncs (finish checks, admissions)")


@dataclass(frozen=True)
class TaskOptions:
    title: ClassVar[str] = "task sets"
    method: Literal["r3v", "star"] = option(
        "r3v", "r3v: SFT + self-refine + self-select; star: SFT on correct samples only")
    n_candidates: int = option(3, "candidates shown in a self-select example")
    selects_per_question: int = option(2, "self-select examples per question at most")
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
    epochs: int = option(3, "passes over each iteration's training mix")
    lr: float = option(3e-5, "peak learning rate")
    lr_scheduler: Literal[LR_SCHEDULERS] = option(
        "constant_with_warmup", "learning-rate schedule (transformers.get_scheduler name)")
    warmup_steps: int = option(10, "optimizer steps of linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 = no clipping)")
    batch_size: int = option(64, "examples per optimizer step (whole question groups)")
    max_tokens: int = option(4096, "tokens per micro-batch (gradient accumulation over micro-batches)")
    max_length: int = option(2048, "longest example in tokens; longer ones are dropped and counted")
    packing: Literal["tree", "none"] = option(
        "tree", "tree: one token trie per question shares its image + question prefix; none: padded rows")
    loss: Literal["fused", "naive"] = option(
        "fused", "fused: LM head, log-softmax and target gather in one op, logits never stored; "
                 "naive: full logits (the baseline)")
    data_path: Literal["stream", "eager"] = option(
        "stream", "stream: plan steps from token counts, load each step's images in DataLoader workers; "
                  "eager: process every example's image up front and keep it (the baseline)")
    num_workers: int | None = option(
        None, "DataLoader worker processes loading upcoming steps (--data-path stream); 0 = in the training "
              "process; none = min(4, CPU cores per rank - 1)")
    loss_mix: Literal["official", "per-task"] = option(
        "official", "official: token mean over all targets; per-task: weighted sum of per-task token means")
    weight_sft: float = option(1.0, "per-task loss weight of SFT examples")
    weight_refine: float = option(1.0, "per-task loss weight of self-refine examples")
    weight_select: float = option(1.0, "per-task loss weight of self-select examples")
    weight_warmup: float = option(1.0, "per-task loss weight of warm-up examples")
    lora_r: int = option(64, "LoRA rank of the language model's linear layers (0 = full fine-tuning)")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    save_every: int = option(50, "optimizer steps between saved training states (0 = only on interrupt)")
    skip_nonfinite: int = option(0, "optimizer steps with a non-finite loss or gradient to skip (no update, each "
                                    "logged with its questions) before training stops as diverged")


@dataclass(frozen=True)
class EvalOptions:
    title: ClassVar[str] = "evaluation"
    eval_ks: str = option("1,3", "comma-separated K values for maj@K, oracle@K and select@K")
    eval_max_new_tokens: int | None = option(None, "longest evaluated solution in tokens; none = --max-new-tokens")
    select_max_new_tokens: int | None = option(None, "longest reply to the select prompt at test time; "
                                                     "none = the evaluation length")

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

    def validate(self) -> RunConfig:
        """Check choices and ranges; raise UsageError naming the flag. Returns self."""
        for attr, group in zip(_GROUP_ATTRS, GROUPS):
            for name, kind in option_types(group).items():
                coerce(name, getattr(getattr(self, attr), name), kind)
        positive = {"iterations": self.loop.iterations, "k": self.sampling.k, "epochs": self.train.epochs,
                    "batch_size": self.train.batch_size, "max_tokens": self.train.max_tokens,
                    "max_length": self.train.max_length, "chunk_size": self.loop.chunk_size,
                    "sample_batch_size": self.sampling.sample_batch_size,
                    "max_new_tokens": self.sampling.max_new_tokens}
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{flag(name)} must be at least 1, got {value}")
        if self.tasks.n_candidates < 2:
            raise UsageError(f"--n-candidates must be at least 2, got {self.tasks.n_candidates}")
        if self.train.num_workers is not None and self.train.num_workers < 0:
            raise UsageError(f"--num-workers must be at least 0, got {self.train.num_workers}")
        if self.train.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.train.lr}")
        self.eval.k_list()
        return self


FIELD_GROUP: dict[str, type] = {}
for _group in GROUPS:
    for _f in fields(_group):
        if _f.name in FIELD_GROUP:
            raise TypeError(f"option {_f.name!r} is defined in both {FIELD_GROUP[_f.name].__name__} "
                            f"and {_group.__name__}: flags must be unique")
        FIELD_GROUP[_f.name] = _group


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
                defaults: dict[str, Any] | None = None, only: Iterable[str] | None = None) -> list[str]:
    """Add one flag per field of ``groups`` (or of the names in ``only``), one argument group per
    option group; ``defaults`` (field name -> value) replace the field defaults, so that
    ``--help`` shows what a bare run would use. Returns the field names added."""
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
            default = defaults.get(f.name, f.default)
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
    values = flatten_json(loaded)
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
    namespace (for ``print_config``). UsageError for a bad config file."""
    preset, values = preset_and_file_values(argv)
    parser = new_parser(prog, description)
    add_preset_flags(parser, preset)
    add_options(parser, GROUPS, defaults=values)
    args = parser.parse_args(argv)
    cfg = RunConfig.from_flat({name: getattr(args, name) for name in FIELD_GROUP})
    return cfg, args
