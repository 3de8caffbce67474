"""``python -m r3v_fast.evaluate``: evaluate one model — Pass@1, maj@K, oracle@K, select@K.

    python -m r3v_fast.evaluate --preset public --model runs/X/checkpoints/iter_003 \
        --test-data test.jsonl --eval-ks 1,3,6

One sampling pass draws K_max candidates per question; every smaller K reuses the first K of
them, and select@K asks the model to choose among those K with the self-select prompt. Without
``--test-data`` it evaluates on the embedded shapes-math test split. The flags are the run
configuration's own (same names, help and preset values as ``python -m r3v_fast.train``), for
the settings evaluation uses. Prints a JSON object of metrics and, with ``--out``, writes the
per-question rows as JSONL.

Exit codes: 0 done, 2 bad configuration or input (before the model is loaded), 4 the rows
could not be written to ``--out`` (the metrics are printed first).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from r3v_fast.config import (DataOptions, EvalOptions, ModelOptions, RunConfig, RunOptions, SamplingOptions,
                             UsageError, add_options, add_preset_flags, new_parser, option,
                             preset_and_file_values, resolve_bf16)

# The run-configuration settings that evaluation reads.
EVAL_FIELDS = ("model", "trust_remote_code", "bf16",
               "test_data", "data_format", "dataset", "image_root", "shapes_test", "max_test_questions",
               "sampler", "temperature", "top_p", "top_k", "max_new_tokens", "sample_batch_size",
               "eval_ks", "eval_max_new_tokens", "select_max_new_tokens", "seed", "progress")


@dataclass(frozen=True)
class EvaluateOptions:
    """Settings of this command alone."""

    title: ClassVar[str] = "this command"
    select: bool = option(True, "run test-time selection (select@K); --no-select skips it")
    out: str | None = option(None, "write the per-question rows here (JSONL)")


def parse(argv: list[str] | None) -> tuple[RunConfig, EvaluateOptions, bool]:
    preset, values = preset_and_file_values(argv, allowed=EVAL_FIELDS)
    parser = new_parser("python -m r3v_fast.evaluate", __doc__.split("\n\n")[0].replace("``", ""))
    add_preset_flags(parser, preset)
    add_options(parser, (ModelOptions, DataOptions, SamplingOptions, EvalOptions, RunOptions),
                defaults=values, only=EVAL_FIELDS)
    own = add_options(parser, (EvaluateOptions,))
    args = parser.parse_args(argv)
    cfg = RunConfig.from_flat({name: getattr(args, name) for name in EVAL_FIELDS}).validate()
    return cfg, EvaluateOptions(**{name: getattr(args, name) for name in own}), args.print_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, options, print_config = parse(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if print_config:
        flat = cfg.flat()
        print(json.dumps({**{name: flat[name] for name in EVAL_FIELDS}, "select": options.select,
                          "out": options.out}, indent=2, sort_keys=True))
        return 0

    import torch

    from r3v_fast.data import prompts
    from r3v_fast.data.loaders import load_files
    from r3v_fast.data.records import DataError
    from r3v_fast.engine.evaluation import score_questions, summarize
    from r3v_fast.engine.loop import make_sampler
    from r3v_fast.engine.rundir import atomic_write_text
    from r3v_fast.engine.sampler import SamplingParams
    from r3v_fast.model.loading import ModelLoadError, check_model_dir, load_vlm
    from r3v_fast.model.tiny import default_model_dir

    try:
        ks = cfg.eval.k_list()
        model_dir = Path(cfg.model.model) if cfg.model.model else default_model_dir()
        check_model_dir(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        if not cfg.data.test_data:
            from r3v_fast.data.shapes import default_dataset

            paths, fmt = [default_dataset(n_test=cfg.data.shapes_test) / "test.jsonl"], "jsonl"
        else:
            paths, fmt = cfg.data.test_data, cfg.data.data_format
        test, reports = load_files(paths, fmt=fmt, image_root=cfg.data.image_root, strict=False,
                                   check_images=True, dataset=cfg.data.dataset)
        for report in reports:
            if report.skipped:
                print(f"test data: {report.summary()}", file=sys.stderr)
        if cfg.data.max_test_questions is not None:
            test = test[: cfg.data.max_test_questions]
        if not test:
            raise UsageError(f"{', '.join(map(str, paths))}: the test data yields zero usable records")
    except (UsageError, ModelLoadError, DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if resolve_bf16(cfg.model.bf16) else torch.float32
    model, processor = load_vlm(model_dir, dtype=dtype, device=device, trust_remote_code=cfg.model.trust_remote_code)
    model.eval()
    sampler = make_sampler(cfg.sampling, model, processor, show_progress=cfg.run.progress)
    params = SamplingParams.from_options(
        cfg.sampling, k=max(ks), max_new_tokens=cfg.eval.eval_max_new_tokens or cfg.sampling.max_new_tokens,
        seed=cfg.run.seed)
    rows = score_questions(test, sampler, prompts.renderer(processor), ks=ks, params=params,
                           select=options.select,
                           select_max_new_tokens=cfg.eval.select_max_new_tokens or params.max_new_tokens)
    metrics = summarize(rows, ks, select=options.select)
    print(json.dumps(metrics, indent=1))
    if options.out:
        try:
            atomic_write_text(Path(options.out), "".join(json.dumps(r) + "\n" for r in rows))
        except OSError as err:
            print(f"error: cannot write the rows to --out {options.out}: {err.strerror or err}", file=sys.stderr)
            return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
