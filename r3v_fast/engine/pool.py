"""The sample pool: every rationale sampled in every iteration, persisted as JSONL shards.

R³V builds its SFT / refine / select sets from *all* samples seen so far (3·t per question
after t iterations), so the pool is the run's most valuable state. It is written as small
shards, one per (iteration, chunk of questions, rank), each with an atomic write (temporary
file + ``os.replace``): a killed run loses at most the shard in flight, and ``--resume``
skips every chunk whose shard is complete.

Layout::

    <run>/pool/iter_001/chunk_00000.jsonl     one JSON object per sample
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from r3v_fast.engine.rundir import atomic_write_text


@dataclass(frozen=True)
class Sample:
    """One sampled solution of one question."""

    question_id: str
    iteration: int
    index: int               # position among this question's samples of this iteration
    text: str
    answer: str | None       # the extracted final answer (None: unparseable)
    correct: bool


class Pool:
    """Append-only store of samples under ``root``, sharded by iteration and question chunk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def shard_path(self, iteration: int, chunk: int) -> Path:
        return self.root / f"iter_{iteration:03d}" / f"chunk_{chunk:05d}.jsonl"

    def has_shard(self, iteration: int, chunk: int) -> bool:
        return self.shard_path(iteration, chunk).exists()

    def write_shard(self, iteration: int, chunk: int, samples: Iterable[Sample]) -> Path:
        path = self.shard_path(iteration, chunk)
        lines = "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(path, lines)
        return path

    def iterations(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name[5:]) for p in self.root.glob("iter_*") if p.is_dir())

    def samples(self, *, max_iteration: int | None = None) -> list[Sample]:
        """All samples of iterations ≤ max_iteration, in (iteration, shard, line) order."""
        out: list[Sample] = []
        for it in self.iterations():
            if max_iteration is not None and it > max_iteration:
                continue
            for shard in sorted((self.root / f"iter_{it:03d}").glob("chunk_*.jsonl")):
                with open(shard, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            out.append(Sample(**json.loads(line)))
                        except (json.JSONDecodeError, TypeError) as err:
                            raise ValueError(f"{shard}:{lineno}: corrupt pool record ({err})") from err
        return out

    def by_question(self, *, max_iteration: int | None = None) -> dict[str, list[Sample]]:
        """question id -> its samples, oldest first (iteration, then index)."""
        grouped: dict[str, list[Sample]] = defaultdict(list)
        for s in self.samples(max_iteration=max_iteration):
            grouped[s.question_id].append(s)
        for group in grouped.values():
            group.sort(key=lambda s: (s.iteration, s.index))
        return dict(grouped)

    def accuracy(self, iteration: int) -> float:
        samples = [s for s in self.samples(max_iteration=iteration) if s.iteration == iteration]
        return sum(s.correct for s in samples) / len(samples) if samples else float("nan")


def chunk_ranges(n_items: int, chunk_size: int) -> list[range]:
    """Fixed, deterministic chunks of item indices: the unit of sharding and of resume."""
    return [range(i, min(i + chunk_size, n_items)) for i in range(0, n_items, chunk_size)]
