"""The run directory: atomic run files that honour the umask, metrics recorded exactly once."""

import json
import os
import stat

import pytest

from r3v_fast.engine.rundir import RunDir, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_honours_the_umask(tmp_path, umask):
    # A plain open() creates 0o666 & ~umask; the atomic writer must give the same mode.
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.json", "{}")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def _lines(run_dir):
    return [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines()]


def test_a_phase_cut_short_between_its_row_and_progress_is_recorded_once(tmp_path, monkeypatch):
    import r3v_fast.engine.rundir as rundir_module

    run_dir = RunDir(tmp_path)
    run_dir.mark("bootstrap:1", {"iteration": 1, "phase": "bootstrap", "pool_accuracy": 50.0})
    real_write = rundir_module.atomic_write_text

    def full_disk(path, text):
        if path.name == "progress.json":
            raise OSError(28, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(rundir_module, "atomic_write_text", full_disk)
    with pytest.raises(OSError):
        run_dir.mark("train:1", {"iteration": 1, "phase": "train", "steps": 3})
    monkeypatch.setattr(rundir_module, "atomic_write_text", real_write)
    # the row of the unfinished phase is not a result ...
    assert [m["phase"] for m in run_dir.metrics()] == ["bootstrap"]
    # ... the resumed run removes it, runs the phase again and records it once
    assert run_dir.recover_metrics(log=lambda *a: None) == 1
    run_dir.mark("train:1", {"iteration": 1, "phase": "train", "steps": 4})
    assert [(m["phase"], m.get("steps")) for m in _lines(run_dir)] == [("bootstrap", None), ("train", 4)]
    assert run_dir.metrics() == _lines(run_dir)


def test_a_torn_last_line_is_dropped_and_a_damaged_middle_line_is_named(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.mark("eval:0", {"iteration": 0, "phase": "eval", "pass@1": 25.0})
    with open(run_dir.metrics_path, "a") as f:
        f.write('{"iteration": 1, "phase": "train_st')       # a kill in the middle of a write
    assert run_dir.metrics() == [{"iteration": 0, "phase": "eval", "pass@1": 25.0}]
    assert run_dir.recover_metrics(log=lambda *a: None) == 1
    run_dir.append_metrics({"iteration": 1, "phase": "train_step", "step": 1, "loss": 2.0})
    assert [m["phase"] for m in _lines(run_dir)] == ["eval", "train_step"]

    run_dir.metrics_path.write_text('{"iteration": 0, "phase": "eval"}\n{oops\n'
                                    '{"iteration": 1, "phase": "train_step", "step": 1}\n')
    from r3v_fast.config import UsageError

    with pytest.raises(UsageError, match=r"metrics.jsonl:2: damaged metrics record"):
        run_dir.metrics()


def test_training_steps_logged_again_after_a_resume_count_once(tmp_path):
    run_dir = RunDir(tmp_path)
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.0)]:
        run_dir.append_metrics({"iteration": 1, "phase": "train_step", "step": step, "loss": loss})
    # killed after step 3, resumed from the state saved at step 2: step 3 runs and logs again
    run_dir.append_metrics({"iteration": 1, "phase": "train_step", "step": 3, "loss": 1.9})
    assert [(m["step"], m["loss"]) for m in run_dir.metrics()] == [(1, 3.0), (2, 2.5), (3, 1.9)]
    assert run_dir.recover_metrics(log=lambda *a: None) == 1
    assert [(m["step"], m["loss"]) for m in _lines(run_dir)] == [(1, 3.0), (2, 2.5), (3, 1.9)]
