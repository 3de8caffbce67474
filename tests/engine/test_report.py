"""The run's table and plot, on hand-made metrics records."""

import math

import pytest

from r3v_fast.engine import report

EVALS = [
    {"iteration": -1, "phase": "eval", "n": 200, "pass@1": 20.0, "maj@1": 18.0, "oracle@1": 18.0,
     "select@1": 18.0, "maj@3": 22.0, "oracle@3": 40.0, "select@3": 10.0},
    {"iteration": 0, "phase": "eval", "n": 200, "pass@1": 30.0, "maj@1": 29.0, "oracle@1": 29.0,
     "select@1": 29.0, "maj@3": 31.0, "oracle@3": 50.0, "select@3": 20.0, "iteration_seconds": 12.4},
]


def test_table_shows_pass1_and_k_metrics_and_labels_the_base_model():
    table = report.results_table(EVALS + [{"iteration": 0, "phase": "train", "counts": {"warmup": 9}}])
    header, _, base, round0 = table.splitlines()
    assert header == "| iter | pass@1 | maj@3 | oracle@3 | select@3 | pool acc | SFT | REF | SEL | warm | time (s) |"
    assert base.startswith("| base | 20.0 | 22.0 | 40.0 | 10.0 | - |")
    assert round0 == "| 0 | 30.0 | 31.0 | 50.0 | 20.0 | - | - | - | - | 9 | 12 |"
    assert report.format_row(EVALS[1]) == "iteration 0: pass@1 30.0  maj@3 31.0  oracle@3 50.0  select@3 20.0"


def test_standard_error_by_hand():
    assert report._standard_error(50.0, 100) == pytest.approx(5.0)       # sqrt(.25 / 100) = .05
    assert report._standard_error(0.0, 100) == 0.0
    assert report._standard_error(30.0, 200) == pytest.approx(100 * math.sqrt(0.21 / 200))


def test_step_losses_continue_across_iterations_and_keep_the_last_record_of_a_step():
    steps = [{"iteration": 1, "phase": "train_step", "step": s, "loss": 1.0 + s} for s in range(3)]
    steps.append({"iteration": 1, "phase": "train_step", "step": 2, "loss": 9.0})     # logged again on resume
    steps += [{"iteration": 2, "phase": "train_step", "step": s, "loss": 0.5} for s in range(2)]
    assert report._step_losses(steps) == [(0, 1.0, 1), (1, 2.0, 1), (2, 9.0, 1), (3, 0.5, 2), (4, 0.5, 2)]


def test_plot_with_and_without_a_loss_panel(tmp_path):
    pytest.importorskip("matplotlib")
    assert report.write_plot(EVALS, tmp_path / "a.png", title="run")
    steps = [{"iteration": 0, "phase": "train_step", "step": s, "loss": 2.0 / (s + 1)} for s in range(5)]
    assert report.write_plot(EVALS + steps, tmp_path / "b.png", title="run")
    from PIL import Image

    narrow, wide = Image.open(tmp_path / "a.png").size, Image.open(tmp_path / "b.png").size
    assert wide[0] > 1.5 * narrow[0]                                      # the loss panel is there
    assert not report.write_plot([], tmp_path / "c.png")
