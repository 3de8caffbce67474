"""What a run shows its user: the per-iteration line, the final table and the accuracy plot.

All three read the records of ``metrics.jsonl`` (r3v_fast.engine.rundir): one per phase
(``eval``, ``bootstrap``, ``train``) and one per optimizer step (``train_step``).

Iteration numbers: 0 is the model iteration 1 samples from (the base model, or the warm-up
round's model); -1 is the base model evaluated before a warm-up round, shown as "base".
maj@1, oracle@1 and select@1 all equal the first sample's accuracy, so the table and the plot
show Pass@1 and the K > 1 metrics only (metrics.jsonl keeps everything).
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["iteration_label", "format_row", "results_table", "write_plot"]


def iteration_label(iteration: int) -> str:
    """-1 is the base model evaluated before a warm-up round."""
    return "base" if iteration < 0 else str(iteration)


def _accuracy_keys(record: dict) -> list[str]:
    return [k for k in record if "@" in k and (k == "pass@1" or not k.endswith("@1"))]


def format_row(m: dict) -> str:
    return f"iteration {iteration_label(m['iteration'])}: " + "  ".join(
        f"{k} {m[k]:.1f}" for k in _accuracy_keys(m))


def results_table(metrics: list[dict]) -> str:
    """The final printed table: one row per iteration (evaluation plus the example counts)."""
    evals = {m["iteration"]: m for m in metrics if m["phase"] == "eval"}
    trains = {m["iteration"]: m for m in metrics if m["phase"] == "train"}
    boots = {m["iteration"]: m for m in metrics if m["phase"] == "bootstrap"}
    if not evals:
        return "(no evaluation yet)"
    acc_keys = _accuracy_keys(next(iter(evals.values())))
    header = ["iter", *acc_keys, "pool acc", "SFT", "REF", "SEL", "warm", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for it in sorted(evals):
        e, tr, b = evals[it], trains.get(it, {}), boots.get(it, {})
        counts = tr.get("counts", {})
        seconds = e.get("iteration_seconds", e.get("seconds", 0.0))
        cells = [iteration_label(it), *(f"{e[k]:.1f}" for k in acc_keys),
                 f"{b['pool_accuracy']:.1f}" if b else "-",
                 *(str(counts.get(t, "-")) for t in ("sft", "refine", "select", "warmup")), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _standard_error(percent: float, n: int) -> float:
    """Binomial standard error of an accuracy in percent over n questions."""
    p = percent / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def _step_losses(metrics: list[dict]) -> list[tuple[int, float, int]]:
    """(global step, loss, iteration) of every optimizer step, the last record of a step winning
    (a resumed run logs the steps after its last saved state again)."""
    by_step: dict[tuple[int, int], float] = {}
    for m in metrics:
        if m["phase"] == "train_step":
            by_step[(m["iteration"], m["step"])] = m["loss"]
    out, offset, last_iteration, last_step = [], 0, None, -1
    for (iteration, step), loss in sorted(by_step.items()):
        if iteration != last_iteration and last_iteration is not None:
            offset += last_step + 1
        out.append((offset + step, loss, iteration))
        last_iteration, last_step = iteration, step
    return out


def write_plot(metrics: list[dict], path: Path, *, title: str = "") -> bool:
    """Held-out accuracy per iteration (and the training loss per step, when logged) as a PNG;
    skipped (returns False) when matplotlib is missing or nothing was evaluated yet.

    Accuracy panel: Pass@1 and each K > 1 metric with a ±1 binomial standard-error band,
    oracle@K dashed (an upper bound for any selector, not a method), a fixed 0–100 axis, the
    number of questions and the run name in the title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    evals = sorted((m for m in metrics if m["phase"] == "eval"), key=lambda m: m["iteration"])
    if not evals:
        return False
    losses = _step_losses(metrics)
    fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(10.5 if losses else 5.5, 3.6), dpi=120,
                             squeeze=False)
    ax = axes[0][0]
    xs = [m["iteration"] for m in evals]
    n = int(evals[-1].get("n", 0))
    for key in _accuracy_keys(evals[0]):
        ys = [m[key] for m in evals]
        oracle = key.startswith("oracle")
        line, = ax.plot(xs, ys, marker="o", linestyle="--" if oracle else "-", label=key,
                        alpha=0.7 if oracle else 1.0)
        if not oracle:
            errors = [_standard_error(y, int(m.get("n", n))) for y, m in zip(ys, evals)]
            ax.fill_between(xs, [y - e for y, e in zip(ys, errors)], [y + e for y, e in zip(ys, errors)],
                            color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_ylim(0, 100)
    ax.set_xlabel("iteration (0 = the model iteration 1 samples from)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_xticks(xs, [iteration_label(x) for x in xs])
    ax.set_title(f"{title + ': ' if title else ''}{n} questions, band = ±1 s.e.", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if losses:
        loss_ax = axes[0][1]
        loss_ax.plot([s for s, _, _ in losses], [v for _, v, _ in losses], linewidth=0.8)
        for iteration in sorted({i for _, _, i in losses})[1:]:
            first = min(s for s, _, i in losses if i == iteration)
            loss_ax.axvline(first, color="gray", alpha=0.4, linewidth=0.8)
        loss_ax.set_xlabel("optimizer step (all iterations)")
        loss_ax.set_ylabel("training loss")
        loss_ax.set_title("loss per step (lines: a new iteration)", fontsize=9)
        loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
