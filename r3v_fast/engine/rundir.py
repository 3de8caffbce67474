"""The run directory: its whole lifecycle in one place — create, resume, progress, metrics,
checkpoints.

::

    runs/<name>/
      config.json       the resolved configuration (what --resume reads; updated by a resume's changes)
      resume_log.jsonl  one line per resume that changed settings: {name: [old, new]}, phases done
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

__all__ = ["RunDir", "atomic_write_text", "current_umask"]


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one.

    The file gets the mode a plain ``open`` would give it (0o666 less the umask): ``mkstemp``
    creates its file 0600, which would hide run files from the group under umask 022."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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

    # Files and folders that only a run writes: a directory holding any of them holds a run.
    RUN_FILES = ("config.json", "progress.json", "metrics.jsonl", "pool", "train_state", "checkpoints", "eval")

    @classmethod
    def check_new(cls, path: Path) -> None:
        """UsageError if ``path`` already holds (part of) a run: starting afresh there would reuse
        its pool shards and overwrite its config.json, mixing two runs' work."""
        found = [name for name in cls.RUN_FILES if (Path(path) / name).exists()]
        if found:
            raise UsageError(f"{path} already holds a run ({', '.join(found)}): continue it with "
                             f"python -m r3v_fast.train --resume --run-dir {path}, or choose another --run-dir")

    @classmethod
    def create(cls, cfg: RunConfig) -> tuple[RunConfig, RunDir]:
        """A new run: make the directory and write config.json (with run_dir filled in).
        Refuses a directory that already holds a run (:meth:`check_new`)."""
        path = cls.new_path(cfg)
        cls.check_new(path)
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
    def resume(cls, cfg: RunConfig, given: dict | None = None, *,
               record: bool = False) -> tuple[RunConfig, RunDir]:
        """``--resume``: the configuration saved in the run directory, with the settings ``given``
        on the command line applied where they may change (RunConfig.resumed_with; UsageError
        for one that may not). With ``record`` a change is written before any work: appended to
        resume_log.jsonl (old and new values, the phases finished so far), then config.json
        rewritten, so that the next --resume starts from the changed settings."""
        path = cls.find(cfg.run.run_dir)
        run_dir = cls(path)
        try:
            saved = RunConfig.from_json(run_dir.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UsageError(f"--resume: cannot read {run_dir.config_path}: {err}") from None
        resumed, changes = saved.resumed_with(given or {})
        resumed = resumed.replace(run_dir=str(path), resume=True).validate()
        if record and changes:
            entry = {"time": time.time(), "finished": sorted(run_dir.finished()),
                     "changes": {name: [old, new] for name, (old, new) in changes.items()}}
            log = run_dir.resume_log_path
            before = log.read_text(encoding="utf-8") if log.exists() else ""
            atomic_write_text(log, before + json.dumps(entry) + "\n")
            atomic_write_text(run_dir.config_path, resumed.replace(resume=False).to_json())
        return resumed, run_dir

    # ---------------------------------------------------------------- paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def resume_log_path(self) -> Path:
        return self.path / "resume_log.jsonl"

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
        """Record a finished phase, appending its metrics line first. A kill (or a full disk)
        between the two writes leaves a row whose phase progress.json does not list: readers
        ignore it and :meth:`recover_metrics` removes it before the phase runs again."""
        if metrics is not None:
            self.append_metrics(metrics)
        state = self.finished()
        state[key] = time.time()
        atomic_write_text(self.progress_path, json.dumps(state, indent=1))

    def _metric_rows(self) -> tuple[list[dict], bool]:
        """The rows of metrics.jsonl as a phase is recorded exactly once, and whether the file
        holds anything else (a torn last line, a row of an unfinished phase, a duplicate).

        - A last line that does not parse is the write a kill or a full disk cut short: dropped.
          A bad line anywhere else is damage this code does not cause: an error naming it.
        - A phase row ("bootstrap", "train", "eval") counts only when progress.json lists its
          phase (``<phase>:<iteration>``), once.
        - A "train_step" row is keyed by (iteration, step): a resumed training phase logs again
          the steps after its last saved state, and the newest row of a step wins.
        """
        path = self.metrics_path
        if not path.exists():
            return [], False
        lines = path.read_text(encoding="utf-8").split("\n")
        parsed: list[dict] = []
        dirty = bool(lines[-1])          # the last write did not end its line
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "phase" not in row:
                    raise ValueError("not a metrics record")
            except ValueError as err:
                if all(not rest.strip() for rest in lines[lineno:]):
                    dirty = True
                    continue
                raise UsageError(f"{path}:{lineno}: damaged metrics record ({err}); "
                                 "remove the line to resume") from None
            parsed.append(row)
        finished = self.finished()
        latest: dict[tuple, int] = {}
        for i, row in enumerate(parsed):
            if row["phase"] == "train_step":
                latest[("train_step", row.get("iteration"), row.get("step"))] = i
            elif f"{row['phase']}:{row.get('iteration')}" in finished:
                latest.setdefault((row["phase"], row.get("iteration")), i)
        keep = sorted(latest.values())
        return [parsed[i] for i in keep], dirty or len(keep) != len(parsed)

    def metrics(self) -> list[dict]:
        """Every recorded phase once, and every training step once (see :meth:`_metric_rows`)."""
        return self._metric_rows()[0]

    def recover_metrics(self, log=print) -> int:
        """Before a run (re)starts: rewrite metrics.jsonl, atomically, as :meth:`metrics` reads
        it, so that rows of a phase cut short and a torn last line are gone before new rows are
        appended. Returns the number of lines dropped."""
        rows, dirty = self._metric_rows()
        if not dirty:
            return 0
        before = sum(1 for line in self.metrics_path.read_text(encoding="utf-8").split("\n") if line.strip())
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        dropped = before - len(rows)
        log(f"{self.metrics_path}: dropped {dropped} line(s) of an interrupted write")
        return dropped

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

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files and folders (``*.tmp``) that writes interrupted by a
        failure left in the run directory (a failed write can leave megabytes behind on a full
        disk); call it only once the run has stopped writing. Returns what was removed."""
        removed = []
        for parent in (self.path, self.path / "checkpoints", self.path / "eval", self.train_state_dir,
                       *sorted(self.pool_dir.glob("*"))):
            for leftover in sorted(set(Path(parent).glob("*.tmp")) | set(Path(parent).glob(".*.tmp"))):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
        return removed

    def clear_train_state(self) -> None:
        shutil.rmtree(self.train_state_dir, ignore_errors=True)
