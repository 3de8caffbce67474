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
    pool.write_shard(1, 0, [_s("q", 1, 0, True)])
    with open(pool.shard_path(1, 0), "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"chunk_00000.jsonl:2"):
        pool.samples()


def test_chunk_ranges_cover_every_item_once():
    chunks = chunk_ranges(10, 4)
    assert [list(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_ranges(0, 4) == []
