"""The R³V loop on the public data layout: warm-up prompts decided per record, the warm-up
round (iteration 0) and its resume, the model each iteration samples from and trains from."""

import json

import pytest

from r3v_fast import train
from r3v_fast.data import prompts
from r3v_fast.data.loaders import load_files
from r3v_fast.engine import loop
from r3v_fast.engine.loop import warmup_example, warmup_examples
from r3v_fast.engine.report import results_table


def render(messages):
    return prompts.user_text(messages)


def test_warmup_prompt_and_target_per_record_kind(public_chartqa):
    root, qa_file, cot_file = public_chartqa
    (qa, *_), _ = load_files([qa_file], image_root=root / "images")
    (cot, *_), _ = load_files([cot_file], image_root=root / "images")
    direct = warmup_example(qa, render)
    assert direct.prompt == prompts.direct_text(qa)              # direct-answer instruction
    assert direct.target == f"Answer: {qa.answer}" and direct.task == "warmup"
    assert prompts.COT_INSTRUCTION not in direct.prompt
    worked = warmup_example(cot, render)
    assert worked.prompt == prompts.cot_text(cot)                # CoT instruction
    assert worked.target == cot.meta["rationale"] and worked.target.startswith("Solution:")
    # neither prompt repeats the public answer-format instruction
    for example in (direct, worked):
        assert "Answer the question with" not in example.prompt and "First generate" not in example.prompt


def _args(model_dir, root, run_dir, *extra):
    return ["--preset", "smoke", "--model", str(model_dir), "--data", str(root / "chartqa" / "sft_qa.json"),
            "--test-data", str(root / "chartqa" / "sft_qa.json"), "--image-root", str(root / "images"),
            "--warmup-data", str(root / "chartqa" / "sft_qa.json"), str(root / "chartqa" / "*_gpt.json"),
            "--warmup-round", "--run-dir", str(run_dir), "--max-new-tokens", "8", "--eval-max-new-tokens", "8",
            "--chunk-size", "3", "--batch-size", "4", "--max-test-questions", "3", "--progress", "false", *extra]


def _phases(run_dir):
    return [(m["iteration"], m["phase"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if m["phase"] in ("eval", "bootstrap", "train")]


def test_warmup_round_trains_on_warmup_only_then_iteration_1_samples_from_it(
        tiny_qwen2vl_dir, public_chartqa, tmp_path, monkeypatch, capsys):
    from r3v_fast.engine import trainer as trainer_module

    root, *_ = public_chartqa
    run_dir = tmp_path / "run"
    loaded, trained_from, mixes = [], [], []
    real_load, real_init, real_train = loop.Run.load, loop.Run.init_model, loop.Run.train
    monkeypatch.setattr(loop.Run, "load", lambda self, path: (loaded.append(path), real_load(self, path))[1])
    monkeypatch.setattr(loop.Run, "init_model", lambda self, t: (trained_from.append(real_init(self, t)), trained_from[-1])[1])
    monkeypatch.setattr(loop.Run, "train",
                        lambda self, t, examples: (mixes.append((t, list(examples))), real_train(self, t, examples))[1])
    real_step, interrupted = trainer_module.Trainer._step, []

    def flaky(self, wrapper, optimizer, scheduler, step_examples, step):
        if step == 1 and not interrupted:
            interrupted.append(step)
            raise KeyboardInterrupt                  # Ctrl-C in the middle of the warm-up round
        return real_step(self, wrapper, optimizer, scheduler, step_examples, step)

    monkeypatch.setattr(trainer_module.Trainer, "_step", flaky)
    assert train.main(_args(tiny_qwen2vl_dir, root, run_dir)) == 130
    assert json.loads((run_dir / "train_state" / "current.json").read_text())["step"] == 1
    assert _phases(run_dir) == [(-1, "eval")]
    assert train.main(["--resume", "--run-dir", str(run_dir), "--progress", "false"]) == 0
    assert "resuming training at step 1/" in capsys.readouterr().out
    assert _phases(run_dir) == [(-1, "eval"), (0, "train"), (0, "eval"), (1, "bootstrap"), (1, "train"), (1, "eval")]

    # The warm-up round's mix is the warm-up data alone: 6 direct-answer + 3 CoT examples.
    round0 = [examples for t, examples in mixes if t == 0]
    assert round0 and all(len(ex) == 9 and {e.task for e in ex} == {"warmup"} for ex in round0)
    direct = [e for e in round0[0] if e.target.startswith("Answer:")]
    assert len(direct) == 6 and all(prompts.DIRECT_INSTRUCTION in e.prompt for e in direct)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert next(m for m in metrics if m["phase"] == "train" and m["iteration"] == 0)["counts"]["warmup"] == 9
    # Iteration 1 samples from the warm-up round's checkpoint; with --init base (the default)
    # every round trains from the base model.
    checkpoints = run_dir / "checkpoints"
    # evaluate base (-1); [interrupted, resumed] evaluate iter_000, sample from it, evaluate iter_001
    assert loaded == [tiny_qwen2vl_dir, checkpoints / "iter_000", checkpoints / "iter_000", checkpoints / "iter_001"]
    assert trained_from == [tiny_qwen2vl_dir] * 3                      # round 0 twice (resumed), round 1
    table = results_table(metrics)
    assert "| base |" in table and "| 0 |" in table and "| 1 |" in table


def test_warmup_round_without_warmup_data_is_a_usage_error(tiny_qwen2vl_dir, public_chartqa, tmp_path, capsys):
    root, *_ = public_chartqa
    args = _args(tiny_qwen2vl_dir, root, tmp_path / "run")
    i = args.index("--warmup-data")
    del args[i:i + 3]
    assert train.main(args) == 2
    assert "--warmup-round needs warm-up data" in capsys.readouterr().err


@pytest.mark.parametrize("init, expected", [("base", ["base", "base"]), ("previous", ["base", "iter_000"])])
def test_which_weights_each_iteration_uses(init, expected, tmp_path):
    from r3v_fast.config import RunConfig
    from r3v_fast.engine.rundir import RunDir

    cfg = RunConfig().replace(init=init, warmup_round=True)
    run = loop.Run.__new__(loop.Run)
    run.cfg, run.dir, run.model_dir = cfg, RunDir(tmp_path), tmp_path / "base"
    names = ["base" if p == run.model_dir else p.name for p in (run.init_model(0), run.init_model(1))]
    assert names == expected
    assert run.sampling_model(1).name == "iter_000" and run.sampling_model(2).name == "iter_001"
    run.cfg = cfg.replace(warmup_round=False)
    assert run.sampling_model(1) == run.model_dir and run.init_model(1) == run.model_dir


def test_warmup_examples_keep_record_order(public_chartqa):
    root, qa_file, cot_file = public_chartqa
    records, _ = load_files([qa_file, cot_file], image_root=root / "images")
    assert [e.group for e in warmup_examples(records, render)] == [r.id for r in records]


@pytest.mark.parametrize("model", ["tiny_qwen2vl_dir", "tiny_llava_dir"])
def test_max_length_is_checked_against_the_longest_prompt_before_any_work(model, public_chartqa, request):
    """The length a question's shortest example needs (its CoT prompt as the processor expands
    it with the real image, plus one target token and the end-of-turn token), measured here with
    the processor itself on the decoded image: exactly that --max-length passes, one less is
    refused naming the question and the length."""
    from PIL import Image

    from r3v_fast.config import RunConfig, UsageError

    model_dir = request.getfixturevalue(model)
    root, qa_file, cot_file = public_chartqa
    train_records, _ = load_files([qa_file], image_root=root / "images")
    warmup, _ = load_files([cot_file], image_root=root / "images")
    processor = loop.load_processor(model_dir)
    render_real = prompts.renderer(processor)
    need = {}
    for r in train_records:
        ids = processor(text=[render_real(prompts.cot_messages(r))], images=[Image.open(r.image).convert("RGB")],
                        return_tensors="pt")["input_ids"]
        need[r.id] = ids.shape[1] + 2
    for r in warmup:
        ex = warmup_example(r, render_real)
        ids = processor(text=[ex.prompt], images=[Image.open(r.image).convert("RGB")], return_tensors="pt")["input_ids"]
        need[r.id] = ids.shape[1] + 2
    longest_id = max(need, key=need.get)
    data = loop.RunData(train=train_records, test=[], warmup=warmup)
    loop.check_prompt_lengths(RunConfig().replace(max_length=need[longest_id]), data, model_dir)
    with pytest.raises(UsageError, match=f"--max-length {need[longest_id] - 1} .*question {longest_id}'s .*"
                                         f"at least {need[longest_id]}"):
        loop.check_prompt_lengths(RunConfig().replace(max_length=need[longest_id] - 1), data, model_dir)


def _shapes_line(rid, question="How many circles?", answer="2", meta=True):
    obj = {"id": rid, "image": "img.png", "question": question, "answer": answer, "dataset": "shapes-math"}
    if meta:
        obj["meta"] = {"rationale": "I see 2 circles.\nAnswer: 2"}
    return json.dumps(obj) + "\n"


@pytest.mark.parametrize("model_fixture, token", [("tiny_qwen2vl_dir", "<|image_pad|>"),
                                                   ("tiny_qwen2vl_dir", "<|vision_start|>"),
                                                   ("tiny_llava_dir", "<image>")])
def test_records_with_chat_special_tokens_are_skipped_and_named(request, tmp_path, model_fixture, token):
    from PIL import Image

    from r3v_fast.config import DataOptions

    Image.new("RGB", (28, 28), "white").save(tmp_path / "img.png")
    (tmp_path / "train.jsonl").write_text(_shapes_line("ok") + _shapes_line("bad", f"How many {token} circles?"))
    (tmp_path / "warmup.jsonl").write_text(_shapes_line("w-ok") + _shapes_line("w-bare", meta=False))
    processor = loop.load_processor(request.getfixturevalue(model_fixture))
    tokens = loop.chat_special_tokens(processor)
    assert token in tokens
    logged = []
    data = loop.load_run_data(DataOptions(data=(str(tmp_path / "train.jsonl"),),
                                          warmup_data=(str(tmp_path / "warmup.jsonl"),)),
                              log=logged.append, special_tokens=tokens)
    assert [r.id for r in data.train] == ["ok"] and [r.id for r in data.warmup] == ["w-ok"]
    text = "\n".join(logged)
    assert "skipped 1 (chat special token: 1)" in text
    assert f"train.jsonl, line 2 (record 'bad'): the question contains the chat special token {token!r}" in text
    assert "warmup.jsonl, line 2 (record 'w-bare'): shapes-math warm-up record without meta" in text


def test_a_run_without_test_data_says_so(tmp_path):
    from r3v_fast.engine.rundir import RunDir

    run = loop.Run.__new__(loop.Run)
    logged = []
    run.dir, run.log = RunDir(tmp_path), logged.append
    run.data = loop.RunData(train=[], test=[])
    run.load = lambda path: pytest.fail("no model is loaded to evaluate nothing")
    run.eval_phase(1, tmp_path / "checkpoint")
    assert logged == ["iteration 1: no test data (--test-data): not evaluated"]
