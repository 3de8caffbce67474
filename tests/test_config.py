"""Config: presets < config file < flags; every field has a flag."""

import argparse
import dataclasses
import json

import pytest

from r3v_fast.config import PRESETS, RunConfig, add_arguments, from_json, resolve, to_json


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve(parser.parse_args(argv))


def test_precedence(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"k": 5, "lr": 0.5}))
    cfg = parse(["--preset", "smoke", "--config", str(cfg_file), "--lr", "0.25", "--include-warmup", "false"])
    assert cfg.k == 5 and cfg.lr == 0.25 and cfg.include_warmup is False
    assert cfg.iterations == PRESETS["smoke"]["iterations"]
    assert parse(["--resume"]).resume is True and parse(["--resume", "no"]).resume is False


def test_every_field_has_a_flag_and_json_round_trips():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(RunConfig)} <= flags
    cfg = parse(["--model", "/m", "--max-train-questions", "7"])
    assert from_json(to_json(cfg)) == cfg


def test_unknown_config_field_is_an_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 1}))
    with pytest.raises(SystemExit, match="unknown config fields"):
        parse(["--config", str(bad)])


def test_eval_ks():
    assert RunConfig(eval_ks="6,1,3").eval_k_list() == [1, 3, 6]
    with pytest.raises(ValueError):
        RunConfig(eval_ks="0").eval_k_list()
