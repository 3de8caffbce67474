"""One whole R³V iteration, phase by phase: r3v_fast against the public-style pipeline.

Each configuration runs ``python -m r3v_fast.train`` for one iteration in its own process
(bootstrap with K = 3, build the task sets, train one epoch, evaluate Pass@1 and select@3):

    r3v_fast        the defaults: --sampler shared --packing tree --loss fused
    public-style    --sampler hf --packing none --loss naive: K independent generate passes that
                    re-encode the image, padded rows, full logits, test-time selection that
                    re-encodes everything
    one seam off    each of the three seams flipped alone (what each part buys)

and reports, per phase (bootstrap, build, train, eval): wall seconds, tokens/s, peak memory
(GPU memory allocated on CUDA, the process's peak host RSS on CPU) and the work done (samples,
generated tokens, examples, target tokens), so that the work is shown to be the same in every
configuration. Every configuration runs twice; the report gives both wall times and uses the
faster. Ratios compare configurations measured in the same run.

Workloads:
- CPU (always): the shipped tiny model on shapes-math, 200 training and 200 test questions.
- GPU (CUDA only): see ``gpu_workload`` (Qwen2-VL-2B shape, random weights, bf16).

Results: bench/results/iteration.json, keyed by device.
Run:     python -m pytest bench/bench_iteration.py -q -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result  # noqa: E402

CONFIGS = {
    "r3v_fast": [],
    "public-style": ["--sampler", "hf", "--packing", "none", "--loss", "naive"],
    "sampler hf": ["--sampler", "hf"],
    "packing none": ["--packing", "none"],
    "loss naive": ["--loss", "naive"],
}
PHASES = ("bootstrap", "build", "train", "eval")
TARGETS = {"cpu": {"speedup": 2.0}, "cuda": {"speedup": 5.0, "memory_ratio": 0.5}}


RUNNER = Path(__file__).resolve().parent / "iteration_run.py"


def run_config(args: list[str], run_dir: Path, env: dict, runner_args: list[str] = ()) -> dict:
    """Run one iteration in a fresh process (bench/iteration_run.py around python -m
    r3v_fast.train); return its phase records."""
    cmd = [sys.executable, str(RUNNER), *runner_args, "--", *args, "--run-dir", str(run_dir), "--progress", "false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["phase"]: r for r in records if r.get("iteration") == 1 and r["phase"] in ("bootstrap", "train", "eval")}


def phase_table(records: dict) -> dict:
    """Per phase: seconds, work, tokens/s, peak memory."""
    boot, train, ev = records["bootstrap"], records["train"], records["eval"]
    train_tokens = train.get("computed_tokens") or train.get("example_tokens") or 0
    phases = {
        "bootstrap": {"seconds": boot["seconds"], "tokens": boot["generated_tokens"], "samples": boot["samples"],
                      "peak_memory_bytes": boot["peak_memory_bytes"]},
        "build": {"seconds": train["build_seconds"], "examples": sum(train["counts"].values())},
        "train": {"seconds": train["seconds"], "tokens": train_tokens, "examples": train["examples"],
                  "target_tokens": train.get("target_tokens"), "steps": train["steps"],
                  "peak_memory_bytes": train["peak_memory_bytes"]},
        "eval": {"seconds": ev["seconds"], "tokens": ev["generated_tokens"], "questions": ev["n"],
                 "peak_memory_bytes": ev["peak_memory_bytes"]},
    }
    for p in phases.values():
        if p.get("tokens"):
            p["tokens_per_s"] = p["tokens"] / p["seconds"]
    return phases


def compare(workload: str, base_args: list[str], device: str, env: dict, rounds: int = 2,
            runner_args: list[str] = (), configs: dict = CONFIGS) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="r3v_bench_iter_") as tmp:
        for name, extra in configs.items():
            runs = []
            for r in range(rounds):
                records = run_config([*base_args, *extra], Path(tmp) / f"{name.replace(' ', '_')}_{r}", env,
                                     runner_args)
                runs.append(phase_table(records))
            walls = [sum(p["seconds"] for p in run.values()) for run in runs]
            best = runs[walls.index(min(walls))]
            results[name] = {"phases": best, "wall_seconds": min(walls), "wall_seconds_each_run": walls,
                             "runs_disagree": max(walls) > 1.1 * min(walls),
                             "peak_memory_bytes": max(p.get("peak_memory_bytes", 0) for p in best.values()),
                             "metrics": {k: v for k, v in records["eval"].items()
                                         if "@" in k and (k == "pass@1" or not k.endswith("@1"))}}
    base = results["r3v_fast"]
    for name, r in results.items():
        r["time_vs_r3v_fast"] = r["wall_seconds"] / base["wall_seconds"]
        r["memory_vs_r3v_fast"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
        r["phase_time_vs_r3v_fast"] = {p: r["phases"][p]["seconds"] / base["phases"][p]["seconds"]
                                       for p in PHASES if base["phases"][p]["seconds"] > 0}
    public = results["public-style"]
    speedup = public["wall_seconds"] / base["wall_seconds"]
    memory_ratio = base["peak_memory_bytes"] / public["peak_memory_bytes"]
    shares = {p: base["phases"][p]["seconds"] / base["wall_seconds"] for p in PHASES}
    targets = TARGETS["cuda" if device == "cuda" else "cpu"]
    summary = {"workload": workload, "speedup_vs_public": speedup, "memory_vs_public": memory_ratio,
               "r3v_fast_phase_shares": shares, "targets": targets,
               "speedup_target_met": speedup >= targets["speedup"],
               "dominant_phase": max(shares, key=shares.get)}
    if "memory_ratio" in targets:
        summary["memory_target_met"] = memory_ratio <= targets["memory_ratio"]
    return {"summary": summary, "configs": results, "args": base_args}


def print_report(key: str, report: dict) -> None:
    print(f"\n== {key}: {report['summary']['workload']}")
    header = f"{'config':14s} {'wall s':>8s} " + " ".join(f"{p + ' s':>12s}" for p in PHASES) + \
        f" {'peak MB':>9s} {'vs r3v_fast':>11s}"
    print(header)
    for name, r in report["configs"].items():
        cells = " ".join(f"{r['phases'][p]['seconds']:12.2f}" for p in PHASES)
        print(f"{name:14s} {r['wall_seconds']:8.2f} {cells} {r['peak_memory_bytes'] / 2**20:9.0f} "
              f"{r['time_vs_r3v_fast']:10.2f}x  (runs: {', '.join(f'{w:.1f}' for w in r['wall_seconds_each_run'])})")
    s = report["summary"]
    print(f"speed-up vs public-style {s['speedup_vs_public']:.2f}x (target {s['targets']['speedup']}x), "
          f"memory {s['memory_vs_public']:.2f}x of public-style; r3v_fast time shares "
          + ", ".join(f"{p} {v:.0%}" for p, v in s["r3v_fast_phase_shares"].items()))


def test_cpu_one_iteration(benchmark):
    threads = os.environ.get("R3V_BENCH_THREADS", "2")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    args = ["--preset", "default", "--shapes-train", "200", "--shapes-test", "200", "--iterations", "1",
            "--epochs", "1", "--eval-base", "false", "--eval-ks", "1,3", "--bf16", "false"]
    report = benchmark.pedantic(compare, args=("shipped tiny model, shapes-math, 200 train + 200 test questions",
                                               args, "cpu", env), rounds=1, iterations=1)
    report["threads"] = int(threads)
    print_report("cpu", report)
    save_result("iteration.json", "cpu", "cpu_shapes_math_200", report)
    for name, r in report["configs"].items():   # the same work in every configuration
        assert r["phases"]["bootstrap"]["samples"] == report["configs"]["r3v_fast"]["phases"]["bootstrap"]["samples"]


# ---------------------------------------------------------------------------- GPU workload
GPU_TRAIN, GPU_TEST, GPU_IMAGE, GPU_QUESTION_TOKENS, GPU_LENGTHS = 64, 32, 448, (100, 300), (64, 384)


def gpu_workload(folder: Path, *, tiny: bool = False) -> tuple[Path, Path, Path, Path]:
    """A random-weight Qwen2-VL-2B-shaped model directory (bf16, built from its config; the
    tiny tokenizer and a processor sized so that a 448 px image is 256 tokens) and synthetic
    data: 448x448 random images, questions of 100-300 tokens of random words, warm-up records
    with worked solutions. ``tiny`` builds the same pipeline at tiny sizes, to dry-run it on a
    CPU. Returns (model dir, train file, test file, warm-up file)."""
    import numpy as np
    from PIL import Image

    from r3v_fast.data.records import Record, write_records
    from r3v_fast.model.tiny import make_tiny_qwen2vl

    folder.mkdir(parents=True, exist_ok=True)
    side = 112 if tiny else GPU_IMAGE
    model, processor = make_tiny_qwen2vl(seed=0, min_pixels=side * side, max_pixels=side * side)
    if not tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_sampler import qwen2vl_2b_shape

        model = qwen2vl_2b_shape(processor, "cpu")
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    words = ["red", "blue", "circle", "square", "how", "many", "are", "left", "objects", "add", "remove",
             "each", "the", "of", "and", "in", "total", "three", "large", "small"]
    tokenizer = processor.tokenizer

    def question(i: int) -> str:
        target = int(rng.integers(GPU_QUESTION_TOKENS[0], GPU_QUESTION_TOKENS[1] + 1)) // (8 if tiny else 1)
        text = ""
        while len(tokenizer(text)["input_ids"]) < target:
            text += " " + " ".join(rng.choice(words, size=8))
        return text.strip() + "?"

    def records(name: str, n: int, rationale: bool = False) -> list[Record]:
        out = []
        for i in range(n):
            path = folder / "images" / f"{name}-{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
            meta = {"rationale": " ".join(rng.choice(words, size=120 if not tiny else 20)) + "\nAnswer: 1"} \
                if rationale else None
            out.append(Record(id=f"{name}-{i}", image=str(path), question=question(i), answer="1",
                              dataset="shapes-math", meta=meta))
        write_records(folder / f"{name}.jsonl", out)
        return out

    records("train", GPU_TRAIN if not tiny else 6)
    records("test", GPU_TEST if not tiny else 4)
    records("warmup", GPU_TRAIN // 4 if not tiny else 2, rationale=True)
    return model_dir, folder / "train.jsonl", folder / "test.jsonl", folder / "warmup.jsonl"


def gpu_args(model_dir: Path, train: Path, test: Path, warmup: Path, lengths=GPU_LENGTHS) -> list[str]:
    return ["--preset", "public", "--model", str(model_dir), "--data", str(train), "--test-data", str(test),
            "--warmup-data", str(warmup), "--warmup-round", "false", "--iterations", "1", "--epochs", "1",
            "--eval-base", "false", "--eval-ks", "1,3", "--k", "3", "--max-new-tokens", str(lengths[1]),
            "--select-max-new-tokens", "16", "--sample-batch-size", "16", "--batch-size", "16",
            "--max-tokens", "8192", "--max-length", "4096", "--lora-r", "0"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_one_iteration(benchmark, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = gpu_workload(tmp_path / "workload")
    runner = ["--forced-lengths", f"{GPU_LENGTHS[0]},{GPU_LENGTHS[1]}", "--judge-by-hash"]
    args = gpu_args(*paths)
    workload = (f"Qwen2-VL-2B shape, random weights, bf16; {GPU_TRAIN} train + {GPU_TEST} test questions, "
                f"448 px images, {GPU_QUESTION_TOKENS[0]}-{GPU_QUESTION_TOKENS[1]}-token questions, branch "
                f"lengths forced uniform {GPU_LENGTHS[0]}-{GPU_LENGTHS[1]}, correctness by hash")
    full = {"r3v_fast": CONFIGS["r3v_fast"], "public-style": CONFIGS["public-style"]}
    report = benchmark.pedantic(compare, args=(workload, args, "cuda", env), rounds=1, iterations=1,
                                kwargs=dict(rounds=1, runner_args=runner, configs=full))
    print_report("cuda full fine-tuning", report)
    save_result("iteration.json", "cuda", "gpu_qwen2vl2b_full", report)
    lora = compare(workload + ", LoRA r 64", [*args, "--lora-r", "64"], "cuda", env, rounds=1,
                   runner_args=runner, configs=full)
    print_report("cuda LoRA r 64", lora)
    save_result("iteration.json", "cuda", "gpu_qwen2vl2b_lora64", lora)
