"""``python -m r3v_fast.evaluate``: evaluate one model — Pass@1, maj@K, oracle@K, select@K.

    python -m r3v_fast.evaluate --model runs/X/checkpoints/iter_003 --data test.jsonl --k 1,3,6

One sampling pass draws K_max candidates per question; every smaller K reuses the first K
of them, and select@K asks the model to choose among those K with the self-select prompt.
Without ``--data`` it evaluates on the embedded shapes-math test split. Prints a JSON object
of metrics and, with ``--out``, writes the per-question rows as JSONL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3v_fast.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local HF VLM directory (default: the embedded tiny VLM)")
    parser.add_argument("--data", help="test questions (default: the embedded shapes-math test split)")
    parser.add_argument("--data-format", default="auto")
    parser.add_argument("--image-root")
    parser.add_argument("--k", default="1,3", help="comma-separated K values (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sampler", default="shared", choices=["shared", "hf"],
                        help="shared: one prefix KV cache per question for all candidates and the select "
                             "prompt; hf: plain generate (default: %(default)s)")
    parser.add_argument("--max-questions", type=int)
    parser.add_argument("--no-select", action="store_true", help="skip test-time selection")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--out", help="write per-question rows here (JSONL)")
    args = parser.parse_args(argv)

    import torch

    from r3v_fast.config import RunConfig
    from r3v_fast.data.loaders import load_dataset
    from r3v_fast.data.records import DataError
    from r3v_fast.engine.evaluation import score_questions, summarize
    from r3v_fast.engine.loop import UsageError, make_renderer, make_sampler
    from r3v_fast.engine.pool import atomic_write_text
    from r3v_fast.engine.sampler import SamplingParams
    from r3v_fast.model.loading import ModelLoadError, check_model_dir, load_vlm
    from r3v_fast.train import embedded_model_dir

    try:
        ks = RunConfig(eval_ks=args.k).eval_k_list()
        model_dir = Path(args.model) if args.model else embedded_model_dir()
        check_model_dir(model_dir, trust_remote_code=args.trust_remote_code)
        if args.data is None:
            from r3v_fast.data.shapes import default_dataset

            data_path, fmt = default_dataset() / "test.jsonl", "jsonl"
        else:
            data_path, fmt = Path(args.data), args.data_format
        test, report = load_dataset(data_path, fmt=fmt, image_root=args.image_root, strict=False,
                                    check_images=True)
        if report.skipped:
            print(f"test data: {report.summary()}", file=sys.stderr)
        test = test[: args.max_questions] if args.max_questions else test
        if not test:
            raise UsageError(f"{data_path}: the test data yields zero usable records")
    except (UsageError, ModelLoadError, DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, processor = load_vlm(model_dir, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
    model.eval()
    sampler = make_sampler(args.sampler, model, processor, RunConfig(sample_batch_size=args.batch_size))
    params = SamplingParams(k=max(ks), temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    rows = score_questions(test, sampler, make_renderer(processor), ks=ks, params=params,
                           select=not args.no_select)
    metrics = summarize(rows, ks, select=not args.no_select)
    if args.out:
        atomic_write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
