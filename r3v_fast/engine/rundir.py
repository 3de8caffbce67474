"""The run directory: its whole lifecycle in one place — create, resume, progress, metrics,
checkpoints.

::

    runs/<name>/
      config.json       the resolved configuration (what --resume reads)
      progress.json     finished phases: {"eval:0": time, "bootstrap:1": time, ...}
      metrics.jsonl     one JSON object per phase (and per training step)
      accuracy.png      held-out accuracy per iteration
      pool/             every sample (r3v_fast.engine.pool)
      train_state/      the in-flight training state: current.json names its folder (r3v_fast.engine.trainer)
      checkpoints/iter_<t>/   merged HF model + processor (safetensors)
      eval/iter_<t>.jsonl     per-question evaluation rows

A phase is marked finished in progress.json only after its outputs are on disk, and every file
is written atomically (temporary file + rename), so a killed run resumes at the phase in flight
and never reads half a file. The methods here do file work only; under several processes the
caller lets the main process write (r3v_fast.engine.loop).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from r3v_fast.config import RunConfig, UsageError

__all__ = ["RunDir", "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """One run's directory and the files in it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ---------------------------------------------------------------- create / resume
    @staticmethod
    def new_path(cfg: RunConfig) -> Path:
        return Path(cfg.run.run_dir) if cfg.run.run_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")

    @classmethod
    def create(cls, cfg: RunConfig) -> tuple[RunConfig, RunDir]:
        """A new run: make the directory and write config.json (with run_dir filled in).
        Refuses a directory that already holds a run."""
        path = cls.new_path(cfg)
        if (path / "progress.json").exists():
            raise UsageError(f"{path} already holds a run: pass --resume to continue it, "
                             "or choose another --run-dir")
        path.mkdir(parents=True, exist_ok=True)
        cfg = cfg.replace(run_dir=str(path))
        run_dir = cls(path)
        atomic_write_text(run_dir.config_path, cfg.to_json())
        return cfg, run_dir

    @staticmethod
    def find(run_dir: str | None) -> Path:
        """The run to resume: ``run_dir``, or the latest run under ./runs."""
        if run_dir is None:
            runs = sorted(p for p in Path("runs").glob("*") if (p / "config.json").exists())
            if not runs:
                raise UsageError("--resume: no run under ./runs; pass --run-dir")
            return runs[-1]
        path = Path(run_dir)
        if not (path / "config.json").exists():
            raise UsageError(f"--resume: {path} holds no config.json")
        return path

    @classmethod
    def resume(cls, cfg: RunConfig) -> tuple[RunConfig, RunDir]:
        """``--resume``: the configuration saved in the run directory. Only the progress-bar
        switch is taken from the command line."""
        path = cls.find(cfg.run.run_dir)
        try:
            saved = RunConfig.from_json((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UsageError(f"--resume: cannot read {path / 'config.json'}: {err}") from None
        return saved.replace(run_dir=str(path), resume=True, progress=cfg.run.progress), cls(path)

    # ---------------------------------------------------------------- paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def progress_path(self) -> Path:
        return self.path / "progress.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def plot_path(self) -> Path:
        return self.path / "accuracy.png"

    @property
    def pool_dir(self) -> Path:
        return self.path / "pool"

    @property
    def train_state_dir(self) -> Path:
        return self.path / "train_state"

    def checkpoint(self, iteration: int) -> Path:
        return self.path / "checkpoints" / f"iter_{iteration:03d}"

    def eval_rows_path(self, iteration: int) -> Path:
        return self.path / "eval" / f"iter_{iteration:03d}.jsonl"

    # ---------------------------------------------------------------- progress and metrics
    def finished(self) -> dict[str, float]:
        return json.loads(self.progress_path.read_text()) if self.progress_path.exists() else {}

    def done(self, key: str) -> bool:
        return key in self.finished()

    def append_metrics(self, *records: dict) -> None:
        """Append records to metrics.jsonl (one JSON object per line, flushed)."""
        if not records:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()

    def mark(self, key: str, metrics: dict | None = None) -> None:
        """Record a finished phase, appending its metrics line first."""
        if metrics is not None:
            self.append_metrics(metrics)
        state = self.finished()
        state[key] = time.time()
        atomic_write_text(self.progress_path, json.dumps(state, indent=1))

    def metrics(self) -> list[dict]:
        path = self.metrics_path
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    # ---------------------------------------------------------------- files
    def write_eval_rows(self, iteration: int, rows: list[dict]) -> None:
        atomic_write_text(self.eval_rows_path(iteration), "".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self, model, processor, iteration: int) -> Path:
        """Merge LoRA adapters (sampling uses plain weights) and save model + processor as
        safetensors, atomically (written beside, then renamed into place)."""
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        target = self.checkpoint(iteration)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target

    def clear_train_state(self) -> None:
        shutil.rmtree(self.train_state_dir, ignore_errors=True)
