"""Evaluation: Pass@1, maj@K, oracle@K and test-time selection (select@K).

- Pass@1: one greedy CoT answer per question.
- K sampled candidates per question (one sampling pass with K_max; every smaller K uses the
  first K of them):
  - maj@K: majority vote over the canonical extracted answers ("4", "4." and "four" are one
    vote; unparseable answers do not vote; ties go to the answer seen first);
  - oracle@K: at least one candidate is right (an upper bound for any selector);
  - select@K: the model itself is shown the K candidates with the self-select prompt and
    answers greedily. select@1 is the first candidate's correctness (nothing to select).

Questions are scored independently, so ``score_questions`` works on any shard of the test
set; ``summarize`` turns the per-question rows (from all shards) into the metrics.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

from r3v_fast.data import judge, prompts
from r3v_fast.data.prompts import Renderer
from r3v_fast.data.records import Record
from r3v_fast.engine.sampler import Request, Sampler, SamplingParams


def is_right(record: Record, text: str) -> bool:
    """Judge a model output against the record's gold answer with the dataset's judge."""
    return judge.is_correct(record.dataset, text, record.answer, record.choices, record.unit)


def majority_answer(answers: Sequence[str | None]) -> str | None:
    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def sample_and_select(
    sampler: Sampler,
    requests: Sequence[Request],
    params: SamplingParams,
    select_request: Callable[[int, list[str]], Request],
    select_ks: Sequence[int],
    select_params: SamplingParams,
) -> tuple[list[str], list[list[str]], dict[int, list[str]]]:
    """For each CoT request: the greedy completion, ``params.k`` sampled candidates, and for
    every k in ``select_ks`` the greedy answer to ``select_request(i, candidates[:k])``.

    A sampler that has its own ``sample_and_select`` (the shared-prefix sampler) serves all
    three from one prefill of each image + question: the select prompt shares that prefix and
    continues from its cached KV. Any other sampler makes three kinds of plain passes.
    """
    if hasattr(sampler, "sample_and_select"):
        return sampler.sample_and_select(requests, params, select_request=select_request,
                                         select_ks=select_ks, select_params=select_params)
    greedy_params = SamplingParams(k=1, temperature=0.0, max_new_tokens=params.max_new_tokens)
    greedy = [texts[0] for texts in sampler.sample(requests, greedy_params, desc="eval greedy")]
    candidates = (sampler.sample(requests, params, desc=f"eval sample K={params.k}")
                  if params.k > 1 else [[g] for g in greedy])
    selects = {}
    for k in select_ks:
        outs = sampler.sample([select_request(i, c[:k]) for i, c in enumerate(candidates)], select_params,
                              desc=f"eval select@{k}")
        selects[k] = [out[0] for out in outs]
    return greedy, candidates, selects


def score_questions(
    records: Sequence[Record],
    sampler: Sampler,
    render: Renderer,
    *,
    ks: Sequence[int] = (1, 3),
    params: SamplingParams = SamplingParams(),
    select: bool = True,
    select_max_new_tokens: int | None = None,
) -> list[dict]:
    """Per-question evaluation rows: greedy answer, K_max candidates and select outcomes.

    The reply to the select prompt may be as long as ``select_max_new_tokens`` (None: the CoT
    length, ``params.max_new_tokens``): a model that reasons before its "Answer:" line must not
    be cut off. Generation stops at the end-of-turn token or any eos the model lists."""
    if not records:
        return []
    cot = [Request(render(prompts.cot_messages(r)), r.image, key=r.id) for r in records]

    def select_request(i: int, candidates: list[str]) -> Request:
        return Request(render(prompts.select_messages(records[i], candidates)), records[i].image,
                       key=f"{records[i].id}/select{len(candidates)}")

    select_ks = sorted(k for k in set(ks) if k >= 2) if select else []
    greedy, candidates, selects = sample_and_select(
        sampler, cot, SamplingParams(**{**params.__dict__, "k": max(ks)}), select_request, select_ks,
        SamplingParams(k=1, temperature=0.0, max_new_tokens=select_max_new_tokens or params.max_new_tokens))

    rows = []
    for i, (record, g, cands) in enumerate(zip(records, greedy, candidates)):
        row = {
            "id": record.id,
            "greedy": g,
            "greedy_correct": is_right(record, g),
            "answers": [judge.canonical_answer(record.dataset, c, record.choices, record.unit) for c in cands],
            "correct": [is_right(record, c) for c in cands],
            "candidates": cands,
            "select": {str(k): {"text": selects[k][i], "correct": is_right(record, selects[k][i])}
                       for k in select_ks},
            "maj": {},
        }
        for k in ks:
            maj = majority_answer(row["answers"][:k])
            row["maj"][str(k)] = maj is not None and is_right(record, prompts.answer_line(maj))
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict], ks: Sequence[int], *, select: bool = True) -> dict[str, float]:
    """Accuracies in percent over all rows."""
    n = len(rows)
    if n == 0:
        return {"n": 0}

    def pct(values) -> float:
        return 100.0 * sum(bool(v) for v in values) / n

    metrics: dict[str, float] = {"n": n, "pass@1": pct(r["greedy_correct"] for r in rows)}
    for k in sorted(set(ks)):
        metrics[f"maj@{k}"] = pct(r["maj"][str(k)] for r in rows)
        metrics[f"oracle@{k}"] = pct(any(r["correct"][:k]) for r in rows)
        if select:
            metrics[f"select@{k}"] = pct(
                r["correct"][0] if k == 1 else r["select"][str(k)]["correct"] for r in rows)
    return metrics
