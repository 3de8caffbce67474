"""`python -m r3v_fast.evaluate`: metrics for several K from one run, rows on disk, bad input."""

import json

from r3v_fast import evaluate


def test_evaluate_writes_metrics_and_rows(tiny_qwen2vl_dir, tmp_path, capsys):
    from r3v_fast.data.shapes import generate

    data = generate(tmp_path / "shapes", n_train=2, n_test=4, seed=1)
    out = tmp_path / "rows.jsonl"
    code = evaluate.main(["--model", str(tiny_qwen2vl_dir), "--test-data", str(data["test"]), "--eval-ks", "1,2,3",
                          "--max-new-tokens", "8", "--eval-max-new-tokens", "none", "--out", str(out),
                          "--progress", "false"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 4
    for key in ("pass@1", "maj@2", "maj@3", "oracle@3", "select@2", "select@3"):
        assert 0.0 <= metrics[key] <= 100.0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["candidates"]) == 3 and set(r["select"]) == {"2", "3"} for r in rows)
    # oracle@k never decreases with k, and is at least maj@k and select@k
    assert metrics["oracle@3"] >= metrics["oracle@1"]
    assert metrics["oracle@3"] >= max(metrics["maj@3"], metrics["select@3"])


def test_evaluate_bad_input_exits_2(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    for argv, named in ((["--eval-ks", "0,abc"], "--eval-ks must list positive integers"),
                        (["--top-p", "0"], "--top-p must be above 0"),
                        (["--temperature", "-1"], "--temperature must be at least 0"),
                        (["--config", str(tmp_path / "missing.json")], "cannot read config file")):
        assert evaluate.main([*argv, "--model", str(tmp_path / "missing")]) == 2
        assert named in capsys.readouterr().err


def test_evaluate_shares_the_run_flags(capsys):
    """evaluate's flags are the run configuration's own: same names, same preset values."""
    assert evaluate.main(["--preset", "public", "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_new_tokens"] == 384 and shown["bf16"] is None and shown["select"] is True
    assert evaluate.main(["--print-config", "--no-select", "--bf16", "--trust-remote-code"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_new_tokens"] == 48 and shown["bf16"] is True and shown["trust_remote_code"] is True
    assert shown["select"] is False and "lr" not in shown
