"""The sample pool: every rationale sampled in every iteration, persisted as JSONL shards.

R³V builds its SFT / refine / select sets from *all* samples seen so far (3·t per question
after t iterations), so the pool is the run's most valuable state. It is written as small
shards, one per (iteration, chunk of questions, rank), each with an atomic write (temporary
file + ``os.replace``): a killed run loses at most the shard in flight, and ``--resume``
skips every chunk whose shard is complete.

A shard is not trusted for existing. Its last line records what it holds — the chunk's
question ids and the number of samples — and a shard is *intact* only when that line is there
and agrees with the sample lines above it (and, on resume, with the chunk's questions and K
of the run). A shard emptied, cut at a line boundary (the record line is gone) or torn in a
line (a line does not parse) is damaged: the loop samples its chunk again (the draws depend
only on seed, iteration, question and branch, so it gets the same samples), and reading the
pool refuses a damaged shard with a message naming it, so no phase trains on part of a pool.

Layout::

    <run>/pool/iter_001/chunk_00000.jsonl     one JSON object per sample, then
                                              {"shard": {"question_ids": [...], "samples": n}}
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


class DamagedShard(ValueError):
    """A pool shard that does not hold what its record line says (or has no record line)."""


class Pool:
    """Append-only store of samples under ``root``, sharded by iteration and question chunk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def shard_path(self, iteration: int, chunk: int) -> Path:
        return self.root / f"iter_{iteration:03d}" / f"chunk_{chunk:05d}.jsonl"

    def has_shard(self, iteration: int, chunk: int) -> bool:
        return self.shard_path(iteration, chunk).exists()

    def write_shard(self, iteration: int, chunk: int, samples: Iterable[Sample],
                    question_ids: Iterable[str] | None = None) -> Path:
        """Write a chunk's samples, then the record line: the chunk's question ids (by default
        those of the samples, in order of appearance) and the sample count."""
        samples = list(samples)
        if question_ids is None:
            question_ids = dict.fromkeys(s.question_id for s in samples)
        record = {"shard": {"question_ids": list(question_ids), "samples": len(samples)}}
        path = self.shard_path(iteration, chunk)
        lines = "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in samples)
        atomic_write_text(path, lines + json.dumps(record, ensure_ascii=False) + "\n")
        return path

    def read_shard(self, path: Path) -> tuple[list[Sample], list[str]]:
        """(samples, question ids) of one shard; :class:`DamagedShard` naming the file (and the
        line) when it does not parse, lacks its record line or disagrees with it."""
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise DamagedShard(f"{path}: cannot read pool shard ({err})") from None
        rows = [(lineno, line) for lineno, line in enumerate(lines, 1) if line.strip()]
        if not rows:
            raise DamagedShard(f"{path}: empty pool shard")
        samples: list[Sample] = []
        for lineno, line in rows[:-1]:
            try:
                samples.append(Sample(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise DamagedShard(f"{path}:{lineno}: corrupt pool record ({err})") from None
        lineno, line = rows[-1]
        try:
            record = json.loads(line)["shard"]
            question_ids, count = list(record["question_ids"]), int(record["samples"])
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            raise DamagedShard(f"{path}:{lineno}: the shard's record line (question ids, sample count) "
                               "is missing or torn: the shard was cut short") from None
        if count != len(samples):
            raise DamagedShard(f"{path}: holds {len(samples)} samples, its record line says {count}")
        strays = {s.question_id for s in samples} - set(question_ids)
        if strays:
            raise DamagedShard(f"{path}: samples of questions outside the shard: {sorted(strays)[:3]}")
        return samples, question_ids

    def shard_problem(self, iteration: int, chunk: int, question_ids: list[str],
                      samples_per_question: int) -> str | None:
        """Why the chunk's shard cannot be used for these questions at K samples each (missing,
        damaged, written for other questions or another K), or None when it is intact."""
        path = self.shard_path(iteration, chunk)
        if not path.exists():
            return "missing"
        try:
            samples, recorded = self.read_shard(path)
        except DamagedShard as err:
            return str(err)
        if recorded != list(question_ids):
            return f"{path}: written for other questions than chunk {chunk} holds now"
        if len(samples) != samples_per_question * len(recorded):
            return (f"{path}: holds {len(samples)} samples, {samples_per_question} per question "
                    f"makes {samples_per_question * len(recorded)}")
        return None

    def iterations(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name[5:]) for p in self.root.glob("iter_*") if p.is_dir())

    def samples(self, *, max_iteration: int | None = None) -> list[Sample]:
        """All samples of iterations ≤ max_iteration, in (iteration, shard, line) order;
        :class:`DamagedShard` (a ValueError) naming the first damaged shard."""
        out: list[Sample] = []
        for it in self.iterations():
            if max_iteration is not None and it > max_iteration:
                continue
            for shard in sorted((self.root / f"iter_{it:03d}").glob("chunk_*.jsonl")):
                out.extend(self.read_shard(shard)[0])
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
