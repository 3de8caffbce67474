"""Task builders: the public R³V rules on hand-made pools (issue: the engine's "done when")."""

from collections import Counter

import pytest

from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.pool import Sample
from r3v_fast.engine.tasks import TaskOptions, build_examples


def render(messages):
    return prompts.user_text(messages)      # plain text stands in for a chat template here


def record(qid="q1", answer="4"):
    return Record(id=qid, image="/tmp/img.png", question="How many objects?", answer=answer, dataset="shapes-math")


def pool_of(qid, marks, iteration=1):
    return {qid: [Sample(qid, iteration, i, f"rationale {i} {'right' if ok else 'wrong'}\nAnswer: "
                         f"{4 if ok else 5}", "4" if ok else "5", ok) for i, ok in enumerate(marks)]}


def build(marks, seed=0, **opts):
    return build_examples([record()], pool_of("q1", marks), render, TaskOptions(include_warmup=False, **opts),
                          seed=seed)


def test_one_right_two_wrong():
    examples, counts = build([True, False, False])
    assert counts == Counter(sft=1, refine=1, select=1)
    select = next(e for e in examples if e.task == "select")
    assert select.prompt.count("right") == 1 and select.prompt.count("wrong") == 2   # 1 pos + 2 neg
    assert select.target == "Answer: 4"                                               # answer only


def test_two_right_one_wrong():
    examples, counts = build([True, True, False])
    assert counts == Counter(sft=1, refine=1, select=1)
    select = next(e for e in examples if e.task == "select")
    assert select.prompt.count("right") == 2 and select.prompt.count("wrong") == 1   # 2 pos + 1 neg


def test_all_right_gives_sft_only_and_all_wrong_nothing():
    assert build([True, True, True])[1] == Counter(sft=1)
    assert build([False, False, False]) == ([], Counter())


def test_newest_samples_are_used():
    pool = pool_of("q1", [True, False])
    pool["q1"] += [Sample("q1", 2, 0, "newest right\nAnswer: 4", "4", True),
                   Sample("q1", 2, 1, "newest wrong\nAnswer: 5", "5", False)]
    examples, _ = build_examples([record()], pool, render, TaskOptions(include_warmup=False))
    sft = next(e for e in examples if e.task == "sft")
    refine = next(e for e in examples if e.task == "refine")
    assert sft.target == "newest right\nAnswer: 4"
    assert refine.target == "newest right\nAnswer: 4" and "newest wrong" in refine.prompt


def test_two_selects_when_both_rules_apply_and_limit():
    _, counts = build([True, True, False, False])
    assert counts["select"] == 2
    _, counts = build([True, True, False, False], selects_per_question=1)
    assert counts["select"] == 1


def test_select_candidates_shuffled_deterministically():
    orders = set()
    for seed in range(8):
        examples, _ = build([True, False, False], seed=seed)
        orders.add(next(e for e in examples if e.task == "select").prompt)
    assert len(orders) > 1                                       # order depends on the seed
    again = [next(e for e in build([True, False, False], seed=3)[0] if e.task == "select").prompt
             for _ in range(2)]
    assert again[0] == again[1]


def test_star_keeps_sft_only_and_warmup_is_appended():
    examples, counts = build([True, False, False], method="star")
    assert counts == Counter(sft=1)
    from r3v_fast.engine.examples import Example

    warm = Example(task="warmup", group="w", image="/tmp/img.png", prompt="p", target="t")
    _, counts = build_examples([record()], pool_of("q1", [True]), render, TaskOptions(), warmup=[warm])
    assert counts == Counter(sft=1, warmup=1)


@pytest.mark.parametrize("n", [2, 4])
def test_other_candidate_counts(n):
    examples, _ = build([True, True, True, False, False, False], n_candidates=n)
    for e in examples:
        if e.task == "select":
            assert e.prompt.count("Model's prediction") == n
