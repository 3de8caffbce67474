"""Settings: one definition per option, flags generated from the fields, presets < config file
< flags, --help that explains itself, --print-config, and the learning-rate schedule names."""

import argparse
import json
import shutil
import typing
from dataclasses import fields

import pytest
import torch

from r3v_fast import config, train
from r3v_fast.config import GROUPS, PRESETS, RunConfig, UsageError, parse_run_config


def parse(argv):
    return parse_run_config(argv)[0]


def _other_value(name, kind, default):
    """A value different from ``default`` that the flag accepts, as (command-line text, value)."""
    base, _ = config._unwrap_optional(kind)
    if typing.get_origin(base) is tuple:
        item_choices = config._choices(typing.get_args(base)[0])
        value = item_choices[0] if item_choices else "a.json"
        return value, (value,)
    if typing.get_origin(base) is typing.Literal:
        value = next(c for c in typing.get_args(base) if c != default)
        return str(value), value
    if base is bool:
        return ("false", False) if default else ("true", True)
    if base is int:
        return "7", 7
    if base is float:
        return "0.125", 0.125
    return "some/path", "some/path"


def test_every_field_of_every_group_is_reachable_from_the_command_line():
    flat_defaults = RunConfig().flat()
    for group in GROUPS:
        for name, kind in config.option_types(group).items():
            text, value = _other_value(name, kind, flat_defaults[name])
            cfg = parse(["--preset", "public", "--" + name.replace("_", "-"), text])
            assert cfg.flat()[name] == value, name
    # ... and the run configuration is exactly the groups: nothing is defined twice.
    names = [f.name for group in GROUPS for f in fields(group)]
    assert len(names) == len(set(names)) and set(names) == set(RunConfig().flat())


def test_every_flag_has_help_and_enumerations_list_their_choices():
    parser = argparse.ArgumentParser()
    config.add_options(parser, GROUPS)
    options = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
               and a.dest != "help"]
    assert len(options) == len(RunConfig().flat())
    for action in options:
        assert action.help and "\n" not in action.help, action.dest
    by_dest = {a.dest: a for a in options}
    for name, choices in {"method": ("r3v", "star"), "init": ("base", "previous"),
                          "sampler": ("shared", "hf"), "packing": ("tree", "none"),
                          "loss_mix": ("official", "per-task"),
                          "lr_scheduler": config.LR_SCHEDULERS}.items():
        assert all(c in by_dest[name].metavar for c in choices), name
    assert "chartqa" in by_dest["data_format"].metavar
    with pytest.raises(SystemExit):
        parse(["--method", "dpo"])


def test_help_shows_the_values_of_the_chosen_preset(capsys):
    for preset, lr in (("default", "0.0003"), ("public", "3e-05")):
        with pytest.raises(SystemExit):
            parse(["--preset", preset, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"peak learning rate (default: {lr})" in text
        lora = PRESETS[preset].get("lora_r", 64)
        assert f"(0 = full fine-tuning) (default: {lora})" in text
    assert "(default: None) (default: None)" not in text


def test_precedence_preset_file_flags(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"k": 5, "lr": 0.5}))
    cfg = parse(["--preset", "smoke", "--config", str(flat), "--lr", "0.25", "--include-warmup", "false"])
    assert cfg.sampling.k == 5 and cfg.train.lr == 0.25 and cfg.tasks.include_warmup is False
    assert cfg.loop.iterations == PRESETS["smoke"]["iterations"]
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"train": {"lr": 0.5}, "sampling": {"k": 4}}))
    cfg = parse(["--config", str(nested)])
    assert cfg.train.lr == 0.5 and cfg.sampling.k == 4
    assert parse(["--resume"]).run.resume is True and parse(["--resume", "no"]).run.resume is False
    assert parse(["--no-progress"]).run.progress is False
    assert parse(["--max-train-questions", "none"]).data.max_train_questions is None
    assert parse(["--warmup-data", "qa.json", "cot*.json"]).data.warmup_data == ("qa.json", "cot*.json")
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_bad_config_files_and_values_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nope": 1}))
    with pytest.raises(UsageError, match="unknown config fields"):
        parse(["--config", str(bad)])
    bad.write_text(json.dumps({"packing": "zip"}))
    with pytest.raises(UsageError, match="--packing.*tree, none"):
        parse(["--config", str(bad)])
    bad.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(UsageError, match="--lr"):
        parse(["--config", str(bad)])
    with pytest.raises(UsageError, match="--iterations must be at least 1"):
        parse(["--iterations", "0"]).validate()
    assert train.main(["--config", str(tmp_path / "missing.json")]) == 2
    bad.write_text("[1, 2]")
    with pytest.raises(UsageError, match=r"bad\.json: a configuration file must hold a JSON object"):
        parse(["--config", str(bad)])


def test_eval_ks():
    assert config.EvalOptions(eval_ks="6,1,3").k_list() == [1, 3, 6]
    for bad in ("0", "a,b", ""):
        with pytest.raises(UsageError):
            config.EvalOptions(eval_ks=bad).k_list()


def test_print_config_shows_the_resolved_configuration(tmp_path, capsys):
    assert train.main(["--preset", "public", "--lr", "1e-4", "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["lr"] == 1e-4 and shown["train"]["lora_r"] == 64
    assert shown["sampling"]["max_new_tokens"] == 384
    assert not (tmp_path / "runs").exists()


def test_print_config_with_resume_shows_what_would_be_resumed(tmp_path, capsys):
    from r3v_fast.engine.rundir import RunDir

    saved, run_dir = RunDir.create(parse(["--preset", "smoke", "--run-dir", str(tmp_path / "r"), "--k", "5"]))
    written = run_dir.config_path.read_text()
    assert train.main(["--resume", "--run-dir", str(run_dir.path), "--lr", "1e-5", "--iterations", "4",
                       "--eval-ks", "1,5", "--k", "5", "--print-config"]) == 0
    shown = RunConfig.from_json(capsys.readouterr().out)
    assert shown.sampling.k == 5 and shown.run.resume is True          # the saved value (given again: fine)
    assert (shown.train.lr, shown.loop.iterations, shown.eval.eval_ks) == (1e-5, 4, "1,5")   # the changes
    assert shown.run.run_dir == str(run_dir.path) and shown.data == saved.data
    assert run_dir.config_path.read_text() == written                  # --print-config writes nothing
    assert not run_dir.resume_log_path.exists()
    assert train.main(["--resume", "--run-dir", str(tmp_path / "none"), "--print-config"]) == 2


@pytest.mark.parametrize("argv, recorded", [
    (["--k", "9"], "--k 5"), (["--seed", "1"], "--seed 0"), (["--method", "star"], "--method r3v"),
    (["--temperature", "0.5"], "--temperature 0.9"), (["--max-length", "999"], "--max-length 384"),
    (["--data", "other.jsonl"], "--data (none)"), (["--model", "elsewhere"], "--model none"),
    (["--batch-size", "4"], "--batch-size 16"), (["--chunk-size", "3"], "--chunk-size 8"),
])
def test_resume_refuses_settings_that_would_mix_incompatible_work(argv, recorded, tmp_path, capsys):
    from r3v_fast.engine.rundir import RunDir

    _, run_dir = RunDir.create(parse(["--preset", "smoke", "--run-dir", str(tmp_path / "r"), "--k", "5"]))
    written = run_dir.config_path.read_text()
    assert train.main(["--resume", "--run-dir", str(run_dir.path), *argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"{argv[0]} " in err and f"started with {recorded}" in err and "--lr" in err
    assert train.main(["--resume", "--run-dir", str(run_dir.path), *argv]) == 2
    assert run_dir.config_path.read_text() == written


def test_resume_takes_changes_from_a_config_file_and_refuses_a_preset(tmp_path, capsys):
    from r3v_fast.engine.rundir import RunDir

    _, run_dir = RunDir.create(parse(["--preset", "smoke", "--run-dir", str(tmp_path / "r")]))
    changes = tmp_path / "changes.json"
    changes.write_text(json.dumps({"train": {"lr": 2e-4, "save_every": 1}}))
    assert train.main(["--resume", "--run-dir", str(run_dir.path), "--config", str(changes), "--print-config"]) == 0
    shown = RunConfig.from_json(capsys.readouterr().out)
    assert (shown.train.lr, shown.train.save_every) == (2e-4, 1)
    changes.write_text(json.dumps({"k": 7}))
    assert train.main(["--resume", "--run-dir", str(run_dir.path), "--config", str(changes), "--print-config"]) == 2
    assert "--k 7: this run was started with --k 3" in capsys.readouterr().err
    assert train.main(["--resume", "--run-dir", str(run_dir.path), "--preset", "public", "--print-config"]) == 2
    assert "--preset cannot be combined with --resume" in capsys.readouterr().err
    # a changed value is still range-checked
    assert train.main(["--resume", "--run-dir", str(run_dir.path), "--lr", "-1", "--print-config"]) == 2


def test_resume_records_its_changes(tmp_path):
    """RunDir.resume(record=True) (what a resumed run does before any work): the change goes to
    resume_log.jsonl with the phases finished so far, and config.json takes the new values."""
    from r3v_fast.engine.rundir import RunDir

    _, run_dir = RunDir.create(parse(["--preset", "smoke", "--run-dir", str(tmp_path / "r")]))
    run_dir.mark("eval:0")
    _, args = parse_run_config(["--resume", "--run-dir", str(run_dir.path), "--lr", "1e-5", "--no-progress"])
    cfg, _ = RunDir.resume(parse(["--resume", "--run-dir", str(run_dir.path)]), args.given, record=True)
    assert cfg.train.lr == 1e-5 and cfg.run.progress is False
    saved = RunConfig.from_json(run_dir.config_path.read_text())
    assert saved.train.lr == 1e-5 and saved.run.progress is False and saved.sampling.k == 3
    [entry] = [json.loads(line) for line in run_dir.resume_log_path.read_text().splitlines()]
    assert entry["changes"] == {"lr": [1e-3, 1e-5], "progress": [True, False]}
    assert entry["finished"] == ["eval:0"]
    # the same flags again change nothing more
    RunDir.resume(parse(["--resume", "--run-dir", str(run_dir.path)]), args.given, record=True)
    assert len(run_dir.resume_log_path.read_text().splitlines()) == 1


def test_a_new_run_refuses_a_directory_holding_a_run(tmp_path, capsys):
    from r3v_fast.engine.rundir import RunDir

    for leftover in ("config.json", "pool", "progress.json", "train_state"):
        path = tmp_path / leftover
        path.mkdir() if "." not in leftover else path.write_text("{}")
        with pytest.raises(UsageError, match=f"already holds a run \\({leftover}\\).*--resume --run-dir"):
            RunDir.create(parse(["--run-dir", str(tmp_path)]))
        assert train.main(["--preset", "smoke", "--run-dir", str(tmp_path)]) == 2
        assert "already holds a run" in capsys.readouterr().err
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (tmp_path / "notes.txt").write_text("mine")          # a directory with other files is fine
    cfg, run_dir = RunDir.create(parse(["--run-dir", str(tmp_path)]))
    assert run_dir.config_path.exists()


def test_presets_name_only_real_fields():
    for values in PRESETS.values():
        assert set(values) <= set(RunConfig().flat())
        RunConfig().replace(**values).validate()


@pytest.mark.parametrize("name", config.LR_SCHEDULERS)
def test_scheduler_names_drive_the_learning_rate(name):
    """Every --lr-scheduler choice is a transformers.get_scheduler name; the n-th optimizer step
    (1-based) runs at the schedule's value at step n (hand-computed here)."""
    import math

    from r3v_fast.engine.trainer import lr_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = lr_schedule(optimizer, name, warmup_steps=4, total_steps=12)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ramp = [0.25, 0.5, 0.75]
    expected = {
        "constant_with_warmup": ramp + [1.0] * 9,
        "constant": [1.0] * 12,
        "linear": ramp + [(12 - n) / 8 for n in range(4, 13)],
        "cosine": ramp + [0.5 * (1 + math.cos(math.pi * (n - 4) / 8)) for n in range(4, 13)],
    }[name]
    assert seen == pytest.approx(expected)


# ------------------------------------------------------------------------------ ranges
@pytest.mark.parametrize("argv, named", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["--sample-batch-size", "0"], "--sample-batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be above 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--temperature", "-1"], "--temperature must be at least 0"),
    (["--top-p", "0"], "--top-p must be above 0"),
    (["--top-p", "1.5"], "--top-p must be at most 1"),
    (["--top-k", "-1"], "--top-k must be at least 0"),
    (["--lora-r", "-5"], "--lora-r must be at least 0"),
    (["--lora-dropout", "1"], "--lora-dropout must be below 1"),
    (["--save-every", "-1"], "--save-every must be at least 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    (["--max-grad-norm", "-0.5"], "--max-grad-norm must be at least 0"),
    (["--weight-refine", "-1"], "--weight-refine must be at least 0"),
    (["--kv-block-size", "0"], "--kv-block-size must be at least 1"),
    (["--eval-max-new-tokens", "0"], "--eval-max-new-tokens must be at least 1"),
    (["--max-train-questions", "0"], "--max-train-questions must be at least 1"),
    (["--num-workers", "-1"], "--num-workers must be at least 0"),
    (["--n-candidates", "1"], "--n-candidates must be at least 2"),
    (["--max-length", "4096", "--max-tokens", "2048"], "--max-tokens (2048) must be at least --max-length (4096)"),
    (["--eval-ks", "0,abc"], "--eval-ks must list positive integers"),
])
def test_every_range_is_checked_when_the_configuration_is_resolved(argv, named, capsys):
    """Out-of-range values end as exit 2 naming the flag, before anything is loaded."""
    with pytest.raises(UsageError, match=named.replace("(", r"\(").replace(")", r"\)")):
        parse(argv).validate()
    assert train.main([*argv, "--print-config"]) == 2
    assert named in capsys.readouterr().err


def test_boundary_values_are_accepted():
    cfg = parse(["--temperature", "0", "--top-p", "1", "--top-k", "0", "--lora-r", "0", "--save-every", "0",
                 "--lora-dropout", "0", "--max-grad-norm", "0", "--num-workers", "0", "--warmup-steps", "0"])
    assert cfg.validate() is cfg


def test_every_numeric_field_has_a_range():
    """A new numeric option cannot slip in unchecked."""
    for group in GROUPS:
        for f, kind in config._option_fields(group):
            base, _ = config._unwrap_optional(kind)
            if base in (int, float):
                assert config.bounds_of(f), f"{group.__name__}.{f.name} has no range"
