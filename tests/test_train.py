"""`python -m r3v_fast.train` end to end on a tiny random Qwen2-VL: a 1-iteration smoke run,
resume after an interruption, bad input (exit code 2), and a 2-process run under
`accelerate launch` (gloo, CPU) with sampling sharded by question."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r3v_fast import train
from r3v_fast.engine.pool import Pool
from r3v_fast.model.loading import load_vlm

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: int):
    """`python -c code` in a fresh process from the repository root, on one thread."""
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from r3v_fast.data.shapes import generate

    out = tmp_path_factory.mktemp("shapes")
    generate(out, n_train=12, n_test=6, seed=0, n_warmup=6)
    return out


def smoke_args(model_dir, data_dir, run_dir, *extra):
    return ["--preset", "smoke", "--model", str(model_dir), "--data", str(data_dir / "train.jsonl"),
            "--test-data", str(data_dir / "test.jsonl"), "--warmup-data", str(data_dir / "warmup.jsonl"),
            "--run-dir", str(run_dir), "--max-new-tokens", "12", "--eval-max-new-tokens", "12",
            "--chunk-size", "4", "--progress", "false", *extra]


def phases(run_dir):
    """(iteration, phase) of every finished phase (per-step training records left out)."""
    return [(m["iteration"], m["phase"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if m["phase"] != "train_step"]


def test_smoke_run(tiny_qwen2vl_dir, shapes_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir)) == 0
    assert phases(run_dir) == [(0, "eval"), (1, "bootstrap"), (1, "train"), (1, "eval")]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("pass@1", "maj@3", "oracle@3", "select@3"):
        assert 0.0 <= last[key] <= 100.0
    samples = Pool(run_dir / "pool").samples()
    assert len(samples) == 12 * 3                                   # K = 3 per question
    assert (run_dir / "accuracy.png").stat().st_size > 0
    assert json.loads((run_dir / "config.json").read_text())["loop"]["iterations"] == 1
    model, _ = load_vlm(run_dir / "checkpoints" / "iter_001")      # generic HF path
    assert model is not None
    out = capsys.readouterr().out
    assert "| iter | pass@1 |" in out


def _spin(stop):
    while not stop.is_set():
        pass


def test_same_results_while_other_processes_load_the_cores(tiny_qwen2vl_dir, shapes_dir, tmp_path):
    """A run is a function of its settings, its machine's instruction set and its thread count,
    not of the machine's load: the same smoke run, once alone and once next to busy processes on
    every core, gives byte-identical pool shards and evaluation rows, the same metrics and the
    same final weights."""
    import multiprocessing

    from safetensors.torch import load_file

    quiet, loaded = tmp_path / "quiet", tmp_path / "loaded"
    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, quiet)) == 0
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    spinners = [context.Process(target=_spin, args=(stop,), daemon=True) for _ in range(2 * (os.cpu_count() or 1))]
    for p in spinners:
        p.start()
    try:
        assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, loaded)) == 0
    finally:
        stop.set()
        for p in spinners:
            p.join(timeout=10)
    for folder in ("pool", "eval"):
        files = sorted(f.relative_to(quiet) for f in (quiet / folder).rglob("*") if f.is_file())
        assert files and files == sorted(f.relative_to(loaded) for f in (loaded / folder).rglob("*") if f.is_file())
        for f in files:
            assert (quiet / f).read_bytes() == (loaded / f).read_bytes(), f

    def numbers(run_dir):    # every metric but the clocks
        rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if not k.endswith("_s") and "second" not in k and "per_s" not in k
                 and "memory" not in k and "wait" not in k and "time" not in k} for r in rows]

    assert numbers(quiet) == numbers(loaded)
    a, b = (load_file(d / "checkpoints" / "iter_001" / "model.safetensors") for d in (quiet, loaded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_outside_training_exits_130_and_resume_clears_leftover_temporaries(tiny_qwen2vl_dir, shapes_dir,
                                                                                      tmp_path):
    """SIGTERM during the first evaluation (before any training) is an interrupt like Ctrl-C:
    exit 130 with the resume command, not death by the signal. A temporary file that a write
    cut short by a kill left in the run directory is removed when the run is resumed."""
    run_dir = tmp_path / "run"
    args = smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir)
    code = ("import os, signal, sys\n"
            "from r3v_fast import train\n"
            "from r3v_fast.engine import loop\n"
            "loop.Run.eval_phase = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGTERM)\n"
            f"sys.exit(train.main({args!r}))\n")
    proc = run_python(code, timeout=600)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert f"interrupted: continue with  python -m r3v_fast.train --resume --run-dir {run_dir}" in proc.stderr
    leftover = run_dir / ".progress.json.k2j4x.tmp"
    leftover.write_text("{")
    assert train.main(["--resume", "--run-dir", str(run_dir), "--progress", "false"]) == 0
    assert not leftover.exists()
    assert phases(run_dir) == [(0, "eval"), (1, "bootstrap"), (1, "train"), (1, "eval")]


def test_resume_after_interrupt(tiny_qwen2vl_dir, shapes_dir, tmp_path, monkeypatch):
    from r3v_fast.engine import sampler as sampler_module

    run_dir = tmp_path / "run"
    real = sampler_module.HFSampler.sample
    calls = {"n": 0}

    def flaky(self, requests, params, *, desc=None):
        if desc and "bootstrap" in desc:
            calls["n"] += 1
            if calls["n"] == 2:                       # die while sampling the second chunk
                raise KeyboardInterrupt
        return real(self, requests, params, desc=desc)

    monkeypatch.setattr(sampler_module.HFSampler, "sample", flaky)
    # The baseline sampler here; the smoke run above covers the default (shared-prefix) one.
    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, "--eval-base", "false",
                                 "--sampler", "hf")) == 130
    pool = Pool(run_dir / "pool")
    assert pool.has_shard(1, 0) and not pool.has_shard(1, 1)   # the finished chunk is kept
    first_shard = pool.shard_path(1, 0).read_text()

    calls["n"] = 10                                            # no more failures
    assert train.main(["--resume", "--run-dir", str(run_dir), "--progress", "false"]) == 0
    assert pool.shard_path(1, 0).read_text() == first_shard   # not resampled
    ids = [s.question_id for s in pool.samples()]
    assert len(ids) == 36 and all(ids.count(q) == 3 for q in set(ids))
    assert phases(run_dir) == [(1, "bootstrap"), (1, "train"), (1, "eval")]


def test_bad_inputs_exit_2(tiny_qwen2vl_dir, shapes_dir, tmp_path, capsys):
    no_processor = tmp_path / "model"
    no_processor.mkdir()
    (no_processor / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert train.main(smoke_args(no_processor, shapes_dir, tmp_path / "r1")) == 2
    assert "error:" in capsys.readouterr().err

    empty = tmp_path / "bad.jsonl"
    empty.write_text('{"id": "x", "image": "nope.png", "question": "", "answer": "1", "dataset": "shapes-math"}\n')
    args = smoke_args(tiny_qwen2vl_dir, shapes_dir, tmp_path / "r2", "--data-format", "jsonl")
    args[args.index("--data") + 1] = str(empty)
    assert train.main(args) == 2
    assert "zero usable records" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()                    # nothing started


TIMING = ("seconds", "iteration_seconds", "build_seconds", "plan_seconds", "batch_ready_s", "data_wait_s",
          "tokens_per_s", "image_cpu_s", "peak_memory_bytes", "memory_kind", "chunks_per_rank")


def test_two_processes_under_accelerate_match_one(tiny_qwen2vl_dir, shapes_dir, tmp_path):
    """DDP over gloo with configs/accelerate/ddp.yaml (on a machine without CUDA the torchrun
    launcher gives two MULTI_CPU ranks): sampling sharded by question, and the pool, the
    evaluation rows and the metrics of a 1-process run."""
    pytest.importorskip("accelerate")
    run_dir, single = tmp_path / "run", tmp_path / "single"
    proc = launch("ddp.yaml", *smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, "--eval-base", "false"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pool = Pool(run_dir / "pool")
    ids = [s.question_id for s in pool.samples()]
    assert len(ids) == 36 and all(ids.count(q) == 3 for q in set(ids))      # each question once per sample
    shards = sorted(p.name for p in (run_dir / "pool" / "iter_001").glob("*.jsonl"))
    assert shards == [f"chunk_{i:05d}.jsonl" for i in range(3)]
    checkpoints = list((run_dir / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["iter_001"]                    # written once, by the main process
    assert phases(run_dir) == [(1, "bootstrap"), (1, "train"), (1, "eval")]
    boot = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert sorted(boot["chunks_per_rank"]) == [1, 2]                       # both ranks sampled

    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, single, "--eval-base", "false")) == 0
    for shard in shards:
        assert (run_dir / "pool" / "iter_001" / shard).read_text() == (single / "pool" / "iter_001" / shard).read_text()
    assert (run_dir / "eval" / "iter_001.jsonl").read_text() == (single / "eval" / "iter_001.jsonl").read_text()
    two, one = (
        [{k: v for k, v in m.items() if k not in TIMING}
         for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())] for d in (run_dir, single))
    assert len(two) == len(one)
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for key in a:        # training sums run in another order over 2 ranks: float rounding only
            if isinstance(a[key], float) and a["phase"].startswith("train"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["phase"], key)
            else:
                assert a[key] == b[key], (a["phase"], key)


def test_resume_after_interrupt_during_training(tiny_qwen2vl_dir, shapes_dir, tmp_path, monkeypatch, capsys):
    from r3v_fast.engine import trainer as trainer_module

    run_dir = tmp_path / "run"
    real = trainer_module.Trainer._step
    seen = []

    def flaky(self, wrapper, optimizer, scheduler, step_examples, step):
        if step == 2 and not seen:
            seen.append(step)
            raise KeyboardInterrupt                      # Ctrl-C in the middle of training
        return real(self, wrapper, optimizer, scheduler, step_examples, step)

    monkeypatch.setattr(trainer_module.Trainer, "_step", flaky)
    args = smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, "--eval-base", "false", "--batch-size", "2",
                      "--epochs", "2")
    assert train.main(args) == 130
    state = json.loads((run_dir / "train_state" / "current.json").read_text())
    assert state["step"] == 2                            # steps 0 and 1 are kept
    assert train.main(["--resume", "--run-dir", str(run_dir), "--progress", "false"]) == 0
    assert "resuming training at step 2/" in capsys.readouterr().out
    assert not (run_dir / "train_state").exists()        # cleaned up once the checkpoint is saved
    assert phases(run_dir) == [(1, "bootstrap"), (1, "train"), (1, "eval")]

    # Nothing lost: the resumed run trains to the same weights as an uninterrupted one.
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    args[args.index("--run-dir") + 1] = str(straight)
    assert train.main(args) == 0
    a = load_file(str(run_dir / "checkpoints" / "iter_001" / "model.safetensors"))
    b = load_file(str(straight / "checkpoints" / "iter_001" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


def test_resume_samples_a_damaged_pool_shard_again(tiny_qwen2vl_dir, shapes_dir, tmp_path, monkeypatch, capsys):
    from r3v_fast.engine import trainer as trainer_module

    run_dir = tmp_path / "run"
    real = trainer_module.Trainer._step

    def interrupted(self, *args):
        raise KeyboardInterrupt                          # stopped once the pool is complete

    monkeypatch.setattr(trainer_module.Trainer, "_step", interrupted)
    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, "--eval-base", "false",
                                 "--sampler", "hf")) == 130
    monkeypatch.setattr(trainer_module.Trainer, "_step", real)
    pool = Pool(run_dir / "pool")
    shard = pool.shard_path(1, 1)
    intact = shard.read_text()
    shard.write_text("".join(intact.splitlines(keepends=True)[:5]))   # cut at a line boundary
    capsys.readouterr()
    assert train.main(["--resume", "--run-dir", str(run_dir), "--progress", "false"]) == 0
    assert "damaged pool shard, chunk 1 is sampled again" in capsys.readouterr().out
    assert shard.read_text() == intact                   # the same draws as the first time
    ids = [s.question_id for s in pool.samples()]
    assert len(ids) == 36 and all(ids.count(q) == 3 for q in set(ids))


class Killed(BaseException):
    """A kill -9 stand-in: no handler catches it, so nothing is saved on the way out."""


def test_a_kill_before_the_training_phase_is_marked_resumes_from_the_saved_step(tiny_qwen2vl_dir, shapes_dir,
                                                                                  tmp_path, monkeypatch, capsys):
    """Training is over and its checkpoint written, but the run dies before "train:1" reaches
    progress.json. The training state is still there, so the resumed run picks up at the last
    saved step instead of training again from step 0; it is removed once the phase is marked."""
    from r3v_fast.engine import loop

    run_dir = tmp_path / "run"
    real_mark = loop.Run.mark

    def mark(self, key, metrics=None):
        if key == "train:1":
            raise Killed
        real_mark(self, key, metrics)

    monkeypatch.setattr(loop.Run, "mark", mark)
    args = smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, "--eval-base", "false", "--batch-size", "4",
                      "--save-every", "1")
    with pytest.raises(Killed):
        train.main(args)
    monkeypatch.undo()
    saved = json.loads((run_dir / "train_state" / "current.json").read_text())["step"]
    assert saved > 0
    capsys.readouterr()
    assert train.main(["--resume", "--run-dir", str(run_dir), "--progress", "false"]) == 0
    assert f"resuming training at step {saved}/{saved + 1}" in capsys.readouterr().out
    assert not (run_dir / "train_state").exists()
    assert phases(run_dir) == [(1, "bootstrap"), (1, "train"), (1, "eval")]


def test_shortened_default_run_on_the_shipped_checkpoint(tmp_path):
    """The embedded default (shipped tiny VLM, shapes-math) shortened to a few dozen questions
    and one iteration: metrics come out and the checkpoint loads through the generic HF path."""
    from r3v_fast.model.tiny import PACKAGED_MODEL

    assert PACKAGED_MODEL.joinpath("config.json").exists()
    run_dir = tmp_path / "run"
    assert train.main(["--preset", "smoke", "--run-dir", str(run_dir), "--progress", "false"]) == 0
    metrics = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if m["phase"] != "train_step"]
    assert [(m["iteration"], m["phase"]) for m in metrics] == [(0, "eval"), (1, "bootstrap"), (1, "train"),
                                                               (1, "eval")]
    base, last = metrics[0], metrics[-1]
    assert base["pass@1"] > 0.0                       # the shipped model already solves some questions
    assert {"pass@1", "maj@3", "select@3"} <= set(last)
    assert json.loads((run_dir / "config.json").read_text())["model"]["model"] is None
    model, processor = load_vlm(run_dir / "checkpoints" / "iter_001")
    assert model.config.model_type == "qwen2_vl" and processor is not None


def test_report_to_tensorboard_and_every_step_in_metrics(tiny_qwen2vl_dir, shapes_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, "--eval-base", "false",
                                 "--batch-size", "4", "--report-to", "tensorboard")) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "train_step"]
    train_summary = next(r for r in records if r["phase"] == "train")
    assert [r["step"] for r in steps] == list(range(train_summary["steps"])) and len(steps) >= 2
    for r in steps:
        assert r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["example_tokens"] >= r["target_tokens"] > 0
    assert train_summary["example_tokens"] == sum(r["example_tokens"] for r in steps)
    event_dir = run_dir / "trackers" / run_dir.name          # the run's scalars (hparams sit in a subfolder)
    assert list(event_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(event_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train_step/loss", "train_step/lr", "train_step/grad_norm", "train_step/tokens_per_s",
                "eval/pass@1", "eval/select@3", "bootstrap/pool_accuracy"):
        assert tag in tags, (tag, sorted(tags))
    assert any(t.startswith("train_step/L_") for t in tags)          # per-task losses
    assert [e.step for e in events.Scalars("train_step/loss")] == [r["step"] for r in steps]
    assert [e.value for e in events.Scalars("train_step/loss")] == pytest.approx([r["loss"] for r in steps], rel=1e-6)


def test_report_to_a_missing_tracker_is_a_usage_error(tiny_qwen2vl_dir, shapes_dir, tmp_path, capsys, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, tmp_path / "run", "--report-to", "wandb")) == 2
    assert "--report-to wandb: not installed" in capsys.readouterr().err


def test_diverged_run_says_how_to_resume_and_resume_takes_the_lower_lr(tiny_qwen2vl_dir, shapes_dir, tmp_path,
                                                                       monkeypatch, capsys):
    """A non-finite loss ends as exit 3 and one message with the resume command; that command with
    a lower --lr continues from the last saved state at the new learning rate (the saved
    optimizer's and schedule's rate are replaced), and the change is recorded. A damaged training
    state ends as exit 4 naming the folder and the phase."""
    import shutil

    from r3v_fast.engine import trainer as trainer_module

    run_dir = tmp_path / "run"
    real = trainer_module.Trainer._step
    calls = []

    def diverging(self, wrapper, optimizer, scheduler, step_batch, step):
        if step == 2 and not calls:
            calls.append(step)
            raise trainer_module.TrainingDiverged("non-finite loss (nan) at step 2; questions in this batch: ['q']")
        return real(self, wrapper, optimizer, scheduler, step_batch, step)

    monkeypatch.setattr(trainer_module.Trainer, "_step", diverging)
    args = smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, "--eval-base", "false", "--batch-size", "2",
                      "--save-every", "1", "--lr-scheduler", "constant")
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert "error: iteration 1 train: training diverged: non-finite loss (nan) at step 2" in err
    assert f"python -m r3v_fast.train --resume --run-dir {run_dir} --lr 0.0001" in err      # smoke lr 1e-3 / 10
    assert "Traceback" not in err

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    for part in (damaged / "train_state").rglob("*"):
        if part.is_file():
            part.write_bytes(b"\x00garbage")
    assert train.main(["--resume", "--run-dir", str(damaged), "--progress", "false"]) == 4
    err = capsys.readouterr().err
    assert f"error: iteration 1 train: {damaged / 'train_state'}: the saved training state cannot be read" in err

    assert train.main(["--resume", "--run-dir", str(run_dir), "--lr", "1e-4", "--progress", "false"]) == 0
    # The state of step s is saved inside step s, before its update (a diverged update is never
    # saved), so the run resumes at step 1, the last step whose state was written.
    assert "resuming training at step 1/" in capsys.readouterr().out
    steps = {}
    for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if m["phase"] == "train_step":
            steps[m["step"]] = m["lr"]                    # a step logged again: the newest row counts
    assert [steps[s] for s in sorted(steps)] == [1e-3] + [1e-4] * (len(steps) - 1)
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 1e-4
    [entry] = [json.loads(line) for line in (run_dir / "resume_log.jsonl").read_text().splitlines()]
    assert entry["changes"] == {"lr": [1e-3, 1e-4]}          # --progress false was the recorded value
    assert entry["finished"] == ["bootstrap:1"]


def test_disk_full_is_one_message_and_leaves_no_temporary_files(tiny_qwen2vl_dir, shapes_dir, tmp_path):
    """A real failed write: the run's process may not write files over 64 kB (RLIMIT_FSIZE, the
    signal ignored, so writes fail with EFBIG as they would with ENOSPC). The first large write
    (the training state or the checkpoint) fails: exit 4, one message with the phase and the
    resume command, no traceback, no *.tmp left behind."""
    run_dir = tmp_path / "run"
    # Batches load in the training process: DataLoader workers hand tensors over in /dev/shm
    # files, which the size limit would cap as well (a different failure than a full run disk).
    args = smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, "--eval-base", "false", "--batch-size", "2",
                      "--save-every", "1", "--num-workers", "0")
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
            "from r3v_fast import train\n"
            f"sys.exit(train.main({args!r}))\n")
    proc = run_python(code, timeout=900)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "error: iteration 1 train: " in proc.stderr and "Traceback" not in proc.stderr
    assert f"--resume --run-dir {run_dir}" in proc.stderr
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert json.loads((run_dir / "progress.json").read_text()).keys() == {"bootstrap:1"}     # nothing lost


def launch(config: str, *args, processes: int = 2, script=None):
    """`accelerate launch --config_file configs/accelerate/<config> --num_processes N` of
    `-m r3v_fast.train` (or of a launcher script), on this machine's CPU cores over gloo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    target = [str(script)] if script else ["-m", "r3v_fast.train"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / config), "--num_processes", str(processes),
           "--mixed_precision", "no", *target, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp_train_interrupt_resume_and_a_checkpoint_for_plain_transformers(tiny_qwen2vl_dir, shapes_dir,
                                                                             tmp_path, monkeypatch, mode):
    """FSDP2 over 2 processes on the CPU: train, interrupted at step 2 (every rank saves its
    part of the training state), resume, and a merged checkpoint that plain transformers loads,
    with the weights of an uninterrupted FSDP run.

    How FSDP runs on a CPU: configs/accelerate/fsdp.yaml (distributed_type: FSDP, fsdp_version:
    2) makes `accelerate launch` start torchrun ranks with ACCELERATE_USE_FSDP=true. accelerate
    alone would run them as DDP over gloo (it enables FSDP for GPU backends only);
    r3v_fast.train.use_fsdp_on_cpu sets the state's distributed type to FSDP and its FSDP2
    plugin, so `Accelerator.prepare` applies `fully_shard` exactly as on GPUs, with gloo doing
    the all-gathers and reduce-scatters. LoRA runs with dropout, so the saved RNG states matter."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    extra = ["--eval-base", "false", "--batch-size", "2", "--save-every", "0", "--max-train-questions", "4",
             "--max-test-questions", "2", "--max-new-tokens", "8", "--eval-max-new-tokens", "8"]
    if mode == "lora":
        extra += ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.2"]
    run_dir, straight = tmp_path / "run", tmp_path / "straight"

    monkeypatch.setenv("R3V_INTERRUPT_AT_STEP", "2")
    killed = launch("fsdp.yaml", *smoke_args(tiny_qwen2vl_dir, shapes_dir, run_dir, *extra),
                    script=REPO / "tests" / "interrupted_train.py")
    monkeypatch.delenv("R3V_INTERRUPT_AT_STEP")
    assert killed.returncode != 0 and "interrupted at step 2" in killed.stdout, killed.stderr[-3000:]
    state = run_dir / "train_state"
    current = json.loads((state / "current.json").read_text())
    assert current["step"] == 2
    assert sorted(p.name for p in (state / current["dir"]).iterdir()) == [
        "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt", "trainable.safetensors"]

    resumed = launch("fsdp.yaml", "--resume", "--run-dir", str(run_dir), "--progress", "false")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming training at step 2/" in resumed.stdout
    assert phases(run_dir) == [(1, "bootstrap"), (1, "train"), (1, "eval")]
    summary = next(m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if m["phase"] == "train")
    # One unit per decoder layer (the tiny model has 2) and the root: the wrapper the trainer
    # shards has no get_input_embeddings, so the embeddings, vision tower, final norm and LM
    # head stay in the root unit (whose weights the fused loss reads directly).
    assert summary["fsdp_units"] == 2 + 1

    done = launch("fsdp.yaml", *smoke_args(tiny_qwen2vl_dir, shapes_dir, straight, *extra))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    checkpoint = run_dir / "checkpoints" / "iter_001"
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)              # plain transformers
    assert not any("lora" in name for name, _ in model.named_parameters())       # merged
    a = load_file(str(checkpoint / "model.safetensors"))
    b = load_file(str(straight / "checkpoints" / "iter_001" / "model.safetensors"))
    base = load_file(str(Path(tiny_qwen2vl_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = [name for name in a if name in base and not torch.equal(a[name], base[name])]
    assert changed                                      # training moved the weights
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name


def test_fsdp_version_1_or_fsdp_without_ranks_is_a_usage_error(tiny_qwen2vl_dir, shapes_dir, tmp_path, capsys,
                                                               monkeypatch):
    """What `accelerate launch` sets for an FSDP config, in a plain process: version 1 is
    refused (r3v_fast runs FSDP2 only), and FSDP without distributed ranks says how to launch."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, tmp_path / "r1")) == 2
    assert "runs FSDP2 (fully_shard) only: set fsdp_version: 2" in capsys.readouterr().err
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert train.main(smoke_args(tiny_qwen2vl_dir, shapes_dir, tmp_path / "r2")) == 2
    assert "configs/accelerate/fsdp.yaml" in capsys.readouterr().err
