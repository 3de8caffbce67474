"""``python -m r3v_fast.train``: run R³V self-training end to end.

With no arguments it runs the embedded default: the synthetic shapes-math task with the
project's tiny VLM, on the CPU, and prints a table of held-out accuracy per iteration. With
``--preset public --model DIR --data FILE --test-data FILE`` (or ``--config run.json``) it runs
on a real local Hugging Face VLM. Under ``accelerate launch`` it runs data-parallel (DDP or
FSDP2, as the accelerate config file says: configs/accelerate/), with sampling sharded by
question. ``--help`` lists every setting with the value the
chosen preset gives it; ``--print-config`` prints the resolved configuration and exits.

Exit codes (each failure ends as one ``error:`` line naming the file, phase and step):
0 done; 2 bad configuration or input (found before any work starts); 3 training diverged (a
non-finite loss: resume with a lower ``--lr``); 4 the run directory cannot be written or read
(disk full, read-only, a damaged state file); 130 interrupted (rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from r3v_fast.config import RunConfig, UsageError, parse_run_config, resolve_bf16

_DESCRIPTION = __doc__.split("\n\n")[0].replace("``", "")

EXIT_USAGE, EXIT_DIVERGED, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 4, 130


def resolved_config(argv: list[str] | None) -> tuple[RunConfig, argparse.Namespace]:
    """The configuration a run with these arguments would use (with --resume: the saved one with
    the changes the command line may make), and the parsed arguments. Nothing is written."""
    cfg, args = parse_run_config(argv, description=_DESCRIPTION)
    if cfg.run.resume:
        from r3v_fast.engine.rundir import RunDir

        if args.preset_given:
            raise UsageError("--preset cannot be combined with --resume: the run keeps the settings saved in "
                             "its config.json; give the ones that may change as flags")
        cfg, _ = RunDir.resume(cfg, args.given)
    return cfg.validate(), args


def write_failure(err: BaseException) -> bool:
    """Whether ``err`` means a file could not be written or read for lack of room or permission:
    an OSError, or what torch's and safetensors' writers raise for one (a RuntimeError such
    as "enforce fail at inline_container.cc: ... file write failed")."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    return type(err).__name__ in ("RuntimeError", "SafetensorError") and any(
        key in text for key in ("file write failed", "inline_container", "No space left", "Read-only file system",
                                "Permission denied", "IoError", "File too large"))


def io_message(err: BaseException) -> str:
    """One line for a failed read or write: the file, and the reason in words."""
    if isinstance(err, OSError) and err.errno is not None:
        reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied", errno.EFBIG: "file too large for this system's limit",
                  errno.EDQUOT: "disk quota exceeded"}.get(err.errno, err.strerror or str(err))
        return f"{err.filename}: {reason}" if err.filename else reason
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"a file could not be written (disk full or not writable?): {first}"


def _warn_preset(cfg: RunConfig, argv: list[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if cfg.model.model is not None and "--preset" not in args and "--config" not in args and not cfg.run.resume:
        print("note: --model is given with the 'default' preset, which is sized for the embedded tiny "
              "model (full fine-tuning at LR 3e-4, 48 new tokens); for a real VLM pass --preset public",
              file=sys.stderr)


def check_trackers(names: tuple[str, ...]) -> list[str] | None:
    """--report-to: the trackers to pass to accelerate, or UsageError naming a missing package."""
    if not names:
        return None
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise UsageError(f"--report-to {' '.join(missing)}: not installed (pip install {' '.join(missing)})")
    return list(names)


def tracker_config(cfg: RunConfig) -> dict:
    """The configuration as trackers take hyperparameters: flat, scalars and strings only."""
    flat = cfg.flat()
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


def fsdp_plugin():
    """The FSDP2 plugin when the launch asks for FSDP, else None.

    ``accelerate launch`` asks for it with ``distributed_type: FSDP`` in the config file
    (configs/accelerate/fsdp.yaml) or ``--use_fsdp``, both of which set ACCELERATE_USE_FSDP=true
    in every rank's environment. r3v_fast runs FSDP2 (``fully_shard``) only: each decoder layer
    is its own unit (transformer_based_wrap; the layer class is filled in from the model when
    training starts), the rest of the model one root unit. Other FSDP_* settings of the config
    (offloading, resharding) are read from the environment by the plugin as usual.
    """
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    if os.environ.get("FSDP_VERSION", "2") != "2":
        raise UsageError(f"the accelerate config asks for FSDP version {os.environ['FSDP_VERSION']}; r3v_fast "
                         "runs FSDP2 (fully_shard) only: set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")


def use_fsdp_on_cpu(accelerator, plugin) -> None:
    """On a machine without CUDA accelerate runs an FSDP launch as DDP over gloo (MULTI_CPU),
    silently. Setting the state's distributed type and plugin drives the same FSDP2 path the
    GPU takes (``prepare`` applies ``fully_shard``; gloo has the all-gather and reduce-scatter
    it needs), so FSDP runs, and is tested, on the CPU."""
    from accelerate.utils import DistributedType

    if plugin is None or accelerator.distributed_type == DistributedType.FSDP:
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise UsageError(f"FSDP was asked for, but accelerate set up {accelerator.distributed_type}: launch "
                         "with `accelerate launch --config_file configs/accelerate/fsdp.yaml` "
                         "(on a CPU-only machine: --num_processes 2 or more)")
    from accelerate.state import PartialState

    # Both shared states: AcceleratorState() copies PartialState's fields whenever it is built
    # again (accelerate's utilities do), which would turn the run back into MULTI_CPU.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = resolved_config(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(cfg.to_json())
        return 0

    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from r3v_fast.data.records import DataError
    from r3v_fast.engine.loop import Run, chat_special_tokens, check_prompt_lengths, load_processor, load_run_data
    from r3v_fast.engine.report import results_table
    from r3v_fast.engine.rundir import RunDir
    from r3v_fast.engine.trainer import TrainingDiverged, TrainStateError, interrupts_as_keyboard_interrupt
    from r3v_fast.model.loading import ModelLoadError, check_model_dir
    from r3v_fast.model.tiny import default_model_dir

    try:
        _warn_preset(cfg, argv)
        if not cfg.run.resume:
            RunDir.check_new(RunDir.new_path(cfg))
        model_dir = Path(cfg.model.model) if cfg.model.model else default_model_dir()
        check_model_dir(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        processor = load_processor(model_dir, cfg.model.trust_remote_code)     # no model weights
        data = load_run_data(cfg.data, special_tokens=chat_special_tokens(processor))
        if cfg.loop.warmup_round and not data.warmup:
            raise UsageError("--warmup-round needs warm-up data (--warmup-data)")
        check_prompt_lengths(cfg, data, model_dir, processor)
        trackers = check_trackers(cfg.run.report_to)
        plugin = fsdp_plugin()
        # cpu=True on a machine without CUDA: otherwise accelerate ignores a multi-process launch
        # (each rank would believe it is alone) instead of using gloo. The trackers' directory is
        # the run directory's, set once it is known (accelerate wants one at construction).
        accelerator = Accelerator(mixed_precision="bf16" if resolve_bf16(cfg.model.bf16) else "no",
                                  cpu=not torch.cuda.is_available(), log_with=trackers, fsdp_plugin=plugin,
                                  project_config=ProjectConfiguration(project_dir=".", logging_dir="."))
        use_fsdp_on_cpu(accelerator, plugin)
        # The main process creates (or finds) the run directory and records a resume's changes;
        # the others follow its choice and read the configuration it saved.
        if accelerator.is_main_process:
            cfg, run_dir = RunDir.resume(cfg, args.given, record=True) if cfg.run.resume else RunDir.create(cfg)
            run_dir.remove_temporaries()      # what writes cut short by a kill left behind
        chosen = [str(run_dir.path) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(chosen)
        cfg, run_dir = RunDir.resume(cfg.replace(run_dir=chosen[0]))
    except (UsageError, ModelLoadError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"error: {io_message(err)}", file=sys.stderr)
        return EXIT_IO
    if trackers:
        accelerator.project_configuration.set_directories(str(run_dir.path))
        accelerator.project_configuration.logging_dir = str(run_dir.path / "trackers")
        accelerator.init_trackers(run_dir.path.name, config=tracker_config(cfg))

    if accelerator.is_main_process:
        print(f"run directory: {run_dir.path}\nmodel: {model_dir}\n"
              f"questions: {len(data.train)} train, {len(data.test)} test, {len(data.warmup)} warm-up")
    run = Run(cfg, run_dir, model_dir, data, accelerator)
    resume = f"python -m r3v_fast.train --resume --run-dir {run_dir.path}"
    try:
        with interrupts_as_keyboard_interrupt():      # SIGTERM in any phase: exit 130, resumable
            metrics = run.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with  {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as err:
        lower = f"{cfg.train.lr / 10:.3g}"
        print(f"error: {run.phase}: training diverged: {err}\nFinished phases are kept; continue from the last "
              f"saved training state (or the start of this training phase if none was saved) with a lower "
              f"learning rate than --lr {cfg.train.lr:g}, e.g.\n  {resume} --lr {lower}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainStateError as err:
        print(f"error: {run.phase}: {err}", file=sys.stderr)
        return EXIT_IO
    except (UsageError, ModelLoadError, DataError) as err:
        print(f"error: {run.phase}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        if not write_failure(err):
            raise
        if accelerator.is_main_process:
            run_dir.remove_temporaries()
        print(f"error: {run.phase}: {io_message(err)}\nNothing finished is lost: free space (or make "
              f"{run_dir.path} writable) and continue with  {resume}", file=sys.stderr)
        return EXIT_IO
    finally:
        if trackers:
            accelerator.end_training()
    if accelerator.is_main_process:
        print("\n" + results_table(metrics))
        print(f"\nmetrics: {run_dir.metrics_path}   plot: {run_dir.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
