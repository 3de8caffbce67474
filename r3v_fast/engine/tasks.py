"""Task builders: turn the sample pool into the SFT, self-refine and self-select sets.

The public R³V rules (docs/architecture.md, "The algorithm"), applied per question over the whole pool:

- SFT: if the question has at least one correct sample, the newest correct one is the target
  of the plain CoT prompt.
- Self-refine (mixed questions only: some right, some wrong): the prompt shows the newest
  wrong rationale, the target is the newest correct one.
- Self-select (mixed questions only): N candidates in shuffled order; "N-1 pos + 1 neg" when
  there are at least N-1 correct samples and "1 pos + N-1 neg" when there are at least N-1
  wrong ones (for N = 3 these are the public "2 pos + 1 neg" and "1 pos + 2 neg"), so up to two
  per question. The target is the answer line only, not a rationale: ``Answer: <gold answer>``.
  The public code copies the positive candidate's own extracted answer instead; both are judged
  right, but they differ in spelling ("12" vs "12.0", "B" vs "(B)", an option's text vs its
  letter). The gold answer teaches one canonical spelling per question, the dataset's own, and
  cannot inherit an extraction slip of the judge; that is the choice here.
- Warm-up data (direct-answer QA and worked CoT) is kept in every mix when asked.

"Newest" means latest iteration, then latest sample index within it. Within each select
variant the newest candidates of each polarity are used; their order is shuffled with a
per-question generator so that the mix is deterministic for a seed.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from r3v_fast.config import TaskOptions
from r3v_fast.data import prompts
from r3v_fast.data.prompts import Renderer
from r3v_fast.data.records import Record
from r3v_fast.engine.examples import Example
from r3v_fast.engine.pool import Sample


def _select_sets(pos: list[Sample], neg: list[Sample], n: int, limit: int) -> list[list[Sample]]:
    """Candidate sets for one mixed question, newest samples first within each polarity."""
    sets = []
    if len(pos) >= n - 1 and neg:
        sets.append(pos[: n - 1] + neg[:1])      # e.g. 2 pos + 1 neg
    if len(neg) >= n - 1 and pos:
        sets.append(pos[:1] + neg[: n - 1])      # e.g. 1 pos + 2 neg
    # For N = 2 both rules describe the same "1 pos + 1 neg" set: keep it once.
    unique = []
    for s in sets:
        if s not in unique:
            unique.append(s)
    return unique[:limit]


def build_examples(
    records: Sequence[Record],
    pool: dict[str, list[Sample]],
    render: Renderer,
    options: TaskOptions = TaskOptions(),
    warmup: Sequence[Example] = (),
    *,
    seed: int = 0,
) -> tuple[list[Example], Counter]:
    """Build the mixed training set; returns the examples and their counts per task.

    ``options.method`` "star" keeps the SFT examples only (no refine, no select); ``seed`` fixes
    the candidate order of the select examples."""
    examples: list[Example] = []
    for record in records:
        samples = pool.get(record.id, [])
        newest_first = sorted(samples, key=lambda s: (s.iteration, s.index), reverse=True)
        pos = [s for s in newest_first if s.correct]
        neg = [s for s in newest_first if not s.correct]
        if not pos:
            continue   # nothing right to learn from ([✗,✗,✗] gives no example)

        def example(task: str, messages: list[dict], target: str) -> Example:
            return Example(task=task, group=record.id, image=record.image, prompt=render(messages),
                           target=target, question_id=record.id)

        examples.append(example("sft", prompts.cot_messages(record), pos[0].text))
        if not neg:
            continue   # all right: SFT only
        if options.include_refine:
            examples.append(example("refine", prompts.refine_messages(record, neg[0].text), pos[0].text))
        if options.include_select:
            rng = random.Random(f"{seed}:{record.id}")
            for candidates in _select_sets(pos, neg, options.n_candidates, options.selects_per_question):
                order = [c.text for c in candidates]
                rng.shuffle(order)
                examples.append(example("select", prompts.select_messages(record, order),
                                        prompts.answer_line(record.answer)))
    if options.include_warmup:
        examples.extend(warmup)
    return examples, Counter(e.task for e in examples)
