"""``python -m r3v_fast.train``: run R³V self-training end to end.

With no arguments it runs the embedded default: the synthetic shapes-math task with the
project's tiny VLM, on the CPU, and prints a table of held-out accuracy per iteration. With
``--preset public --model DIR --data FILE --test-data FILE`` (or ``--config run.json``) it runs
on a real local Hugging Face VLM. Under ``accelerate launch`` it runs data-parallel (DDP or
FSDP2, as the accelerate config file says: configs/accelerate/), with sampling sharded by
question. ``--help`` lists every setting with the value the
chosen preset gives it; ``--print-config`` prints the resolved configuration and exits.

Exit codes: 0 done, 2 bad configuration or input (found before any work starts),
130 interrupted (rerun with ``--resume`` to continue).
"""

from __future__ import annotations

import sys
from pathlib import Path

from r3v_fast.config import RunConfig, UsageError, parse_run_config, resolve_bf16

_DESCRIPTION = __doc__.split("\n\n")[0].replace("``", "")


def resolved_config(argv: list[str] | None) -> tuple[RunConfig, bool]:
    """The configuration a run with these arguments would use (with --resume: the saved one),
    and whether --print-config was asked for."""
    cfg, args = parse_run_config(argv, description=_DESCRIPTION)
    if cfg.run.resume:
        from r3v_fast.engine.rundir import RunDir

        cfg, _ = RunDir.resume(cfg)
    return cfg.validate(), args.print_config


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
        cfg, print_config = resolved_config(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if print_config:
        print(cfg.to_json())
        return 0

    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from r3v_fast.engine.loop import Run, load_run_data
    from r3v_fast.engine.report import results_table
    from r3v_fast.engine.rundir import RunDir
    from r3v_fast.model.loading import ModelLoadError, check_model_dir
    from r3v_fast.model.tiny import default_model_dir

    try:
        _warn_preset(cfg, argv)
        model_dir = Path(cfg.model.model) if cfg.model.model else default_model_dir()
        check_model_dir(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        data = load_run_data(cfg.data)
        if cfg.loop.warmup_round and not data.warmup:
            raise UsageError("--warmup-round needs warm-up data (--warmup-data)")
        trackers = check_trackers(cfg.run.report_to)
        plugin = fsdp_plugin()
        # cpu=True on a machine without CUDA: otherwise accelerate ignores a multi-process launch
        # (each rank would believe it is alone) instead of using gloo. The trackers' directory is
        # the run directory's, set once it is known (accelerate wants one at construction).
        accelerator = Accelerator(mixed_precision="bf16" if resolve_bf16(cfg.model.bf16) else "no",
                                  cpu=not torch.cuda.is_available(), log_with=trackers, fsdp_plugin=plugin,
                                  project_config=ProjectConfiguration(project_dir=".", logging_dir="."))
        use_fsdp_on_cpu(accelerator, plugin)
        # The main process creates (or finds) the run directory; the others follow its choice.
        if accelerator.is_main_process:
            cfg, run_dir = RunDir.resume(cfg) if cfg.run.resume else RunDir.create(cfg)
        chosen = [str(run_dir.path) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(chosen)
        cfg, run_dir = RunDir.resume(cfg.replace(run_dir=chosen[0]))
    except (UsageError, ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if trackers:
        accelerator.project_configuration.set_directories(str(run_dir.path))
        accelerator.project_configuration.logging_dir = str(run_dir.path / "trackers")
        accelerator.init_trackers(run_dir.path.name, config=tracker_config(cfg))

    if accelerator.is_main_process:
        print(f"run directory: {run_dir.path}\nmodel: {model_dir}\n"
              f"questions: {len(data.train)} train, {len(data.test)} test, {len(data.warmup)} warm-up")
    run = Run(cfg, run_dir, model_dir, data, accelerator)
    try:
        metrics = run.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with  python -m r3v_fast.train --resume --run-dir {run_dir.path}",
              file=sys.stderr)
        return 130
    finally:
        if trackers:
            accelerator.end_training()
    if accelerator.is_main_process:
        print("\n" + results_table(metrics))
        print(f"\nmetrics: {run_dir.metrics_path}   plot: {run_dir.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
