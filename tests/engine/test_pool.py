"""Pool: shards round-trip, newest-first grouping, atomic writes, chunking for resume."""

import json

import pytest

from r3v_fast.engine.pool import Pool, Sample, chunk_ranges


def _s(qid, it, idx, ok):
    return Sample(question_id=qid, iteration=it, index=idx, text=f"{qid}-{it}-{idx}", answer="1" if ok else None,
                  correct=ok)


def test_shards_round_trip_and_group_in_order(tmp_path):
    pool = Pool(tmp_path / "pool")
    pool.write_shard(2, 0, [_s("q1", 2, 0, True), _s("q2", 2, 0, False)])
    pool.write_shard(1, 0, [_s("q1", 1, 1, False), _s("q1", 1, 0, True)])
    pool.write_shard(1, 1, [_s("q2", 1, 0, True)])
    assert pool.iterations() == [1, 2]
    grouped = pool.by_question()
    assert [(s.iteration, s.index) for s in grouped["q1"]] == [(1, 0), (1, 1), (2, 0)]
    assert len(pool.by_question(max_iteration=1)["q1"]) == 2
    assert pool.accuracy(1) == pytest.approx(2 / 3)
    assert pool.has_shard(1, 1) and not pool.has_shard(2, 1)


def test_no_partial_shard_left_behind_on_failure(tmp_path, monkeypatch):
    pool = Pool(tmp_path)

    class Boom(Exception):
        pass

    def bad_dumps(*a, **k):
        raise Boom()

    monkeypatch.setattr(json, "dumps", bad_dumps)
    with pytest.raises(Boom):
        pool.write_shard(1, 0, [_s("q", 1, 0, True)])
    monkeypatch.undo()
    assert not pool.has_shard(1, 0)
    assert list(tmp_path.rglob("*.tmp")) == []


def test_corrupt_shard_is_reported_with_file_and_line(tmp_path):
    pool = Pool(tmp_path)
    pool.write_shard(1, 0, [_s("q", 1, 0, True), _s("q", 1, 1, False)])
    path = pool.shard_path(1, 0)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + lines[2])
    with pytest.raises(ValueError, match=r"chunk_00000.jsonl:2"):
        pool.samples()


def _damage(path, how):
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if how == "emptied":
        path.write_text("")
    elif how == "cut at a line boundary":
        path.write_text("".join(lines[:2]))
    elif how == "torn":
        path.write_text(text[:len(text) - 7])
    elif how == "a line removed":
        path.write_text("".join(lines[1:]))


@pytest.mark.parametrize("how", ["emptied", "cut at a line boundary", "torn", "a line removed"])
def test_a_damaged_shard_is_found_and_named(tmp_path, how):
    pool = Pool(tmp_path)
    samples = [_s("q1", 1, 0, True), _s("q1", 1, 1, False), _s("q2", 1, 0, True), _s("q2", 1, 1, True)]
    pool.write_shard(1, 0, samples, question_ids=["q1", "q2"])
    assert pool.shard_problem(1, 0, ["q1", "q2"], 2) is None
    assert pool.samples() == samples
    _damage(pool.shard_path(1, 0), how)
    problem = pool.shard_problem(1, 0, ["q1", "q2"], 2)
    assert problem is not None and "chunk_00000.jsonl" in problem
    with pytest.raises(ValueError, match="chunk_00000.jsonl"):
        pool.samples()                                   # never read as a smaller pool


def test_a_shard_of_other_questions_or_another_k_is_not_used(tmp_path):
    pool = Pool(tmp_path)
    pool.write_shard(1, 0, [_s("q1", 1, 0, True), _s("q2", 1, 0, True)], question_ids=["q1", "q2"])
    assert pool.shard_problem(1, 1, ["q3"], 1) == "missing"
    assert "other questions" in pool.shard_problem(1, 0, ["q1", "q3"], 1)
    assert "2 samples, 3 per question makes 6" in pool.shard_problem(1, 0, ["q1", "q2"], 3)
    assert pool.shard_problem(1, 0, ["q1", "q2"], 1) is None


def test_chunk_ranges_cover_every_item_once():
    chunks = chunk_ranges(10, 4)
    assert [list(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_ranges(0, 4) == []
