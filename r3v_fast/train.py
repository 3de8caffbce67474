"""``python -m r3v_fast.train``: run R³V self-training end to end.

With no arguments it runs the embedded default: the synthetic shapes-math task with the
project's tiny VLM, on the CPU, and prints a table of held-out accuracy per iteration. With
``--model DIR --data FILE --test-data FILE`` (or ``--config run.json``) it runs on a real
local Hugging Face VLM. Under ``accelerate launch`` it runs data-parallel (DDP / FSDP), with
sampling sharded by question.

Exit codes: 0 done, 2 bad configuration or input (found before any work starts),
130 interrupted (rerun with ``--resume`` to continue).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from r3v_fast.config import RunConfig, add_arguments, from_json, resolve, to_json

PACKAGED_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-vlm"
CACHE = Path.home() / ".cache" / "r3v_fast"


def embedded_model_dir() -> Path:
    """The default ``--model``: the shipped tiny VLM checkpoint, or — where the package has
    none — a tiny random Qwen2-VL built once into the user cache (deterministic, seed 0)."""
    if (PACKAGED_MODEL / "config.json").exists():
        return PACKAGED_MODEL
    target = CACHE / "tiny-qwen2vl-random-v1"
    if not (target / "config.json").exists():
        from r3v_fast.model.tiny import build_tiny_qwen2vl

        tmp = target.with_name(target.name + f".tmp{time.time_ns()}")
        build_tiny_qwen2vl(tmp, seed=0)
        if not (target / "config.json").exists():
            tmp.rename(target)
    return target


def load_run_data(cfg: RunConfig):
    """Training, test and warm-up questions; bad records are skipped and counted."""
    from r3v_fast.data.loaders import load_dataset
    from r3v_fast.data.records import DataError
    from r3v_fast.engine.loop import RunData, UsageError

    def load(path, what):
        try:
            records, report = load_dataset(path, fmt=cfg.data_format, image_root=cfg.image_root,
                                           strict=False, check_images=True)
        except (DataError, OSError) as err:
            raise UsageError(f"cannot load {what} data: {err}")
        if report.skipped:
            print(f"{what} data: {report.summary()}")
        return records

    if cfg.data is None:
        from r3v_fast.data.shapes import default_dataset

        root = default_dataset(n_train=cfg.shapes_train, n_test=cfg.shapes_test)
        train, test, warmup = (load(root / f"{name}.jsonl", name) for name in ("train", "test", "warmup"))
    else:
        train = load(cfg.data, "train")
        test = load(cfg.test_data, "test") if cfg.test_data else []
        warmup = load(cfg.warmup_data, "warmup") if cfg.warmup_data else []
    if cfg.max_train_questions is not None:
        train = train[: cfg.max_train_questions]
    if cfg.max_test_questions is not None:
        test = test[: cfg.max_test_questions]
    if not train:
        raise UsageError("the training data yields zero usable records")
    return RunData(train=train, test=test, warmup=warmup if cfg.include_warmup else [])


def saved_config(cfg: RunConfig) -> RunConfig:
    """``--resume``: the configuration saved in the run directory (the latest run under runs/
    when no ``--run-dir`` is given); only the progress-bar switch is taken from the command."""
    from r3v_fast.engine.loop import UsageError

    if cfg.run_dir is None:
        runs = sorted(p for p in Path("runs").glob("*") if (p / "config.json").exists())
        if not runs:
            raise UsageError("--resume: no run under ./runs; pass --run-dir")
        run_dir = runs[-1]
    else:
        run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.json").exists():
        raise UsageError(f"--resume: {run_dir} holds no config.json")
    saved = from_json((run_dir / "config.json").read_text())
    return RunConfig(**{**saved.__dict__, "run_dir": str(run_dir), "resume": True, "progress": cfg.progress})


def prepare_run_dir(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """New run: create the directory and write config.json. ``--resume``: reuse the saved
    configuration (the latest run under runs/ when no ``--run-dir`` is given)."""
    from r3v_fast.engine.loop import UsageError
    from r3v_fast.engine.pool import atomic_write_text

    if cfg.resume:
        cfg = saved_config(cfg)
        return cfg, Path(cfg.run_dir)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if (run_dir / "progress.json").exists():
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it, "
                         "or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(**{**cfg.__dict__, "run_dir": str(run_dir)})
    atomic_write_text(run_dir / "config.json", to_json(cfg))
    return cfg, run_dir


def validate(cfg: RunConfig) -> None:
    from r3v_fast.engine.loop import UsageError

    choices = {"method": ("r3v", "star"), "init": ("base", "previous"), "sampler": ("shared", "hf"),
               "packing": ("tree", "none"), "loss_mix": ("official", "per-task")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if cfg.iterations < 1 or cfg.k < 1:
        raise UsageError("--iterations and --k must be at least 1")
    if cfg.n_candidates < 2:
        raise UsageError("--n-candidates must be at least 2")
    cfg.eval_k_list()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3v_fast.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    import torch
    from accelerate import Accelerator

    from r3v_fast.engine.loop import Run, UsageError, results_table
    from r3v_fast.model.loading import ModelLoadError, check_model_dir

    try:
        cfg = resolve(args)
        if cfg.resume:
            cfg = saved_config(cfg)
        validate(cfg)
        model_dir = Path(cfg.model) if cfg.model else embedded_model_dir()
        check_model_dir(model_dir, trust_remote_code=cfg.trust_remote_code)
        data = load_run_data(cfg)
        use_bf16 = cfg.bf16 if cfg.bf16 is not None else torch.cuda.is_available()
        # cpu=True on a machine without CUDA: otherwise accelerate ignores a multi-process launch
        # (each rank would believe it is alone) instead of using gloo.
        accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no",
                                  cpu=not torch.cuda.is_available())
        # The main process creates (or finds) the run directory; the others follow its choice.
        chosen = [str(prepare_run_dir(cfg)[1]) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(chosen)
        cfg, run_dir = prepare_run_dir(RunConfig(**{**cfg.__dict__, "resume": True, "run_dir": chosen[0]}))
    except (UsageError, ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if accelerator.is_main_process:
        print(f"run directory: {run_dir}\nmodel: {model_dir}\n"
              f"questions: {len(data.train)} train, {len(data.test)} test, {len(data.warmup)} warm-up")
    run = Run(cfg, run_dir, model_dir, data, accelerator)
    try:
        metrics = run.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with  python -m r3v_fast.train --resume --run-dir {run_dir}",
              file=sys.stderr)
        return 130
    if accelerator.is_main_process:
        print("\n" + results_table(metrics))
        print(f"\nmetrics: {run_dir / 'metrics.jsonl'}   plot: {run_dir / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
