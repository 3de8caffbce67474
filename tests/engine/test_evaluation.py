"""Evaluation metrics on a scripted sampler whose outputs are known by hand."""

import pytest

from r3v_fast.data.records import Record
from r3v_fast.engine.evaluation import majority_answer, score_questions, summarize
from r3v_fast.engine.sampler import SamplingParams


class ScriptedSampler:
    """Answers from a table: greedy text, K sampled texts and select answers per question."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def sample(self, requests, params, *, desc=None):
        self.calls.append((desc, params.k, params.temperature))
        out = []
        for r in requests:
            qid = r.prompt.split("|")[0]
            row = self.table[qid]
            if "Model's prediction" in r.prompt:
                out.append([row["select"][r.prompt.count("Model's prediction")]])
            elif params.greedy:
                out.append([row["greedy"]])
            else:
                out.append(row["samples"][: params.k])
        return out


def render(messages):
    text = messages[0]["content"][1]["text"]
    return text


def rec(qid, answer):
    return Record(id=qid, image="/x.png", question=f"{qid}|How many?", answer=answer, dataset="shapes-math")


TABLE = {
    "a": {"greedy": "Answer: 3", "samples": ["Answer: 3", "Answer: 2", "Answer: 2"], "select": {3: "Answer: 3"}},
    "b": {"greedy": "Answer: 1", "samples": ["Answer: 5", "Answer: 4", "Answer: 4"], "select": {3: "Answer: 4"}},
    "c": {"greedy": "no idea", "samples": ["nothing", "Answer: 9", "x"], "select": {3: "Answer: 1"}},
}


def test_metrics_by_hand():
    records = [rec("a", "3"), rec("b", "4"), rec("c", "7")]
    sampler = ScriptedSampler(TABLE)
    rows = score_questions(records, sampler, render, ks=(1, 3), params=SamplingParams(k=3))
    m = summarize(rows, (1, 3))
    # pass@1: a right, b wrong, c wrong
    assert m["pass@1"] == pytest.approx(100 / 3)
    # first samples: a 3 (right), b 5, c unparseable -> maj@1 = select@1 = oracle@1 = 1/3
    assert m["maj@1"] == m["oracle@1"] == m["select@1"] == pytest.approx(100 / 3)
    # maj@3: a -> 2 (wrong), b -> 4 (right), c -> 9 (wrong)
    assert m["maj@3"] == pytest.approx(100 / 3)
    # oracle@3: a (has 3), b (has 4) -> 2/3
    assert m["oracle@3"] == pytest.approx(200 / 3)
    # select@3: a 3 right, b 4 right, c 1 wrong
    assert m["select@3"] == pytest.approx(200 / 3)
    assert m["n"] == 3
    # one greedy pass, one K_max sampling pass, one select pass
    assert [c[0] for c in sampler.calls] == ["eval greedy", "eval sample K=3", "eval select@3"]


def test_select_reply_gets_the_evaluation_length_unless_told_otherwise():
    records = [rec("a", "3")]
    sampler = ScriptedSampler(TABLE)
    sampler.sample = _recording(sampler)
    score_questions(records, sampler, render, ks=(1, 3), params=SamplingParams(k=3, max_new_tokens=40))
    assert sampler.lengths["eval select@3"] == 40            # not cut short: as long as a CoT reply
    score_questions(records, sampler, render, ks=(1, 3), params=SamplingParams(k=3, max_new_tokens=40),
                    select_max_new_tokens=512)
    assert sampler.lengths["eval select@3"] == 512


def _recording(sampler):
    real, sampler.lengths = sampler.sample, {}

    def sample(requests, params, *, desc=None):
        sampler.lengths[desc] = params.max_new_tokens
        return real(requests, params, desc=desc)
    return sample


def test_majority_vote_ignores_unparseable_and_breaks_ties_by_first_seen():
    assert majority_answer([None, "2", "3", "3"]) == "3"
    assert majority_answer(["5", "4"]) == "5"
    assert majority_answer([None, None]) is None


def test_empty_set():
    assert score_questions([], ScriptedSampler({}), render) == []
    assert summarize([], (1,)) == {"n": 0}
