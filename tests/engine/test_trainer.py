"""Trainer: the loss is the NLL of target tokens only (checked by hand on a tiny model), both
loss mixes are exact over a step split into micro-batches, a NaN stops training with the
batch's questions, and a step plan never splits a question group."""

import json

import pytest
import torch
from accelerate import Accelerator

from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.examples import Example
from r3v_fast.engine.trainer import TrainingDiverged, TrainOptions, Trainer, plan_steps
from r3v_fast.model.loading import end_of_turn_id, load_vlm


@pytest.fixture(scope="module")
def model_and_examples(tiny_qwen2vl_dir, rgb_images, tmp_path_factory):
    model, processor = load_vlm(tiny_qwen2vl_dir)
    folder = tmp_path_factory.mktemp("trainer_imgs")
    examples = []
    for i, img in enumerate(rgb_images[:2]):
        path = folder / f"{i}.png"
        img.save(path)
        rec = Record(id=f"q{i}", image=str(path), question="How many red objects are there?", answer="2",
                     dataset="shapes-math")
        render = lambda m: prompts.render(processor, m)   # noqa: E731
        examples += [
            Example("sft", rec.id, str(path), render(prompts.cot_messages(rec)), "I see 2 red objects.\nAnswer: 2", rec.id),
            Example("refine", rec.id, str(path), render(prompts.refine_messages(rec, "I see 3.\nAnswer: 3")),
                    "I see 2 red objects.\nAnswer: 2", rec.id),
            Example("select", rec.id, str(path), render(prompts.select_messages(rec, ["Answer: 3", "Answer: 2", "Answer: 1"])),
                    "Answer: 2", rec.id),
        ]
    return model, processor, examples


def hand_nll(model, processor, example):
    """Target-token NLL sum and count from the model's full logits (float64), by hand."""
    from PIL import Image

    enc = processor(text=[example.prompt], images=[Image.open(example.image).convert("RGB")], return_tensors="pt")
    target = processor.tokenizer(example.target, add_special_tokens=False)["input_ids"] + [end_of_turn_id(processor)]
    ids = torch.cat([enc["input_ids"], torch.tensor([target])], dim=1)
    inputs = {**enc, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in enc:      # Qwen2-VL marks image tokens; target tokens are text (0)
        inputs["mm_token_type_ids"] = torch.cat(
            [enc["mm_token_type_ids"], torch.zeros(1, len(target), dtype=enc["mm_token_type_ids"].dtype)], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    n_prompt = enc["input_ids"].shape[1]
    nll = -sum(logp[n_prompt + j - 1, t].item() for j, t in enumerate(target))
    return nll, len(target)


@pytest.mark.parametrize("packing", ["none", "tree"])
@pytest.mark.parametrize("loss_mix", ["official", "per-task"])
def test_first_step_loss_is_target_token_nll(model_and_examples, packing, loss_mix, tmp_path):
    model, processor, examples = model_and_examples
    hand = [hand_nll(model, processor, ex) for ex in examples]
    weights = {"sft": 1.0, "refine": 0.5, "select": 2.0}
    if loss_mix == "official":
        expected = sum(n for n, _ in hand) / sum(c for _, c in hand)
    else:
        expected = 0.0
        for task, w in weights.items():
            nll = sum(n for (n, _), ex in zip(hand, examples) if ex.task == task)
            count = sum(c for (_, c), ex in zip(hand, examples) if ex.task == task)
            expected += w * nll / count
    # lr 0 leaves the weights alone; max_tokens forces several micro-batches per step.
    opts = TrainOptions(epochs=1, lr=0.0, batch_size=64, max_tokens=400, max_length=1024, packing=packing,
                        loss_mix=loss_mix, weight_sft=1.0, weight_refine=0.5, weight_select=2.0, lora_r=0,
                        save_every=0)
    trainer = Trainer(model, processor, Accelerator(cpu=True), opts, tmp_path / "state", show_progress=False)
    summary = trainer.train(examples)
    first = summary["history"][0]
    assert summary["steps"] == 1
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    sft = [(n, c) for (n, c), ex in zip(hand, examples) if ex.task == "sft"]
    assert first["L_SFT"] == pytest.approx(sum(n for n, _ in sft) / sum(c for _, c in sft), rel=1e-5)


def test_nan_loss_names_the_questions(model_and_examples, tmp_path):
    model, processor, examples = model_and_examples
    import copy

    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    opts = TrainOptions(epochs=1, lr=1e-3, batch_size=64, max_tokens=4096, lora_r=0, save_every=0, packing="none")
    trainer = Trainer(bad, processor, Accelerator(cpu=True), opts, tmp_path / "state", show_progress=False)
    with pytest.raises(TrainingDiverged, match=r"step 0.*q0"):
        trainer.train(examples)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_diverged_update_is_never_saved(model_and_examples, tmp_path):
    """The update of step 2 leaves NaN weights (as --lr 1e6 leaves overflowing ones): step 3 is
    non-finite, training stops, and the state on disk is the one of step 2, whose weights gave a
    finite loss, not the diverged weights after step 2's update."""
    import copy

    from safetensors.torch import load_file

    model, processor, examples = model_and_examples
    model = copy.deepcopy(model)
    seen = {}

    def diverge_after_step_2(record):
        if record["step"] == 2:
            seen["updated"] = _weights(model)
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    # 2 questions x 3 examples, 3 examples per step: 2 steps per epoch, 6 steps in all
    opts = TrainOptions(epochs=3, lr=1e-3, batch_size=3, max_tokens=4096, lora_r=0, save_every=1, packing="none",
                        warmup_steps=0)
    trainer = Trainer(model, processor, Accelerator(cpu=True), opts, tmp_path / "state", show_progress=False,
                      on_step=diverge_after_step_2)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan at step 3; questions in this step: \['q"
                                               r".*training state in .*state is step 2, the last finite one"):
        trainer.train(examples)
    import json

    current = json.loads((tmp_path / "state" / "current.json").read_text())
    assert current["step"] == 2
    saved = load_file(str(tmp_path / "state" / current["dir"] / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    # the saved weights are those step 2 started from, not those its update made
    assert not torch.equal(saved["lm_head.weight"], seen["updated"]["lm_head.weight"])
    assert torch.isfinite(seen["updated"]["lm_head.weight"]).all()


def test_skip_nonfinite_skips_the_update_and_names_the_questions(model_and_examples, tmp_path, monkeypatch):
    import copy

    from r3v_fast.engine import trainer as trainer_module

    model, processor, examples = model_and_examples
    real_weights = trainer_module.loss_weights
    state = {"step": 0}

    def nan_at_step_1(tasks, counts, options):          # a NaN loss and gradient at step 1 only
        weights = real_weights(tasks, counts, options)
        return weights * float("nan") if state["step"] == 1 else weights

    monkeypatch.setattr(trainer_module, "loss_weights", nan_at_step_1)
    after = {}

    def note(record):
        after[record["step"]] = _weights(model)
        state["step"] = record["step"] + 1

    opts = TrainOptions(epochs=2, lr=1e-2, batch_size=3, max_tokens=4096, lora_r=0, save_every=0, packing="none",
                        warmup_steps=0, skip_nonfinite=1)
    model = copy.deepcopy(model)
    logged = []
    trainer = Trainer(model, processor, Accelerator(cpu=True), opts, tmp_path / "state", show_progress=False,
                      on_step=note, log=logged.append)
    summary = trainer.train(examples)
    assert summary["nonfinite_skipped"] == 1 and summary["steps"] == 4
    skipped = [r["step"] for r in summary["history"] if r.get("skipped_nonfinite")]
    assert skipped == [1]
    assert any(m.startswith("skipped step 1 without an update (1 of --skip-nonfinite 1): non-finite loss nan "
                            "at step 1; questions in this step: ['q") for m in logged)
    for name, value in after[1].items():          # step 1 changed nothing ...
        assert torch.equal(value, after[0][name]), name
    assert all(torch.isfinite(v).all() for v in after[3].values())
    assert any(not torch.equal(after[3][n], after[1][n]) for n in after[1])   # ... the others trained

    # without the allowance the same step stops training, no state having been saved
    state["step"] = 0
    opts = TrainOptions(epochs=2, lr=1e-2, batch_size=3, max_tokens=4096, lora_r=0, save_every=0, packing="none",
                        warmup_steps=0)
    trainer = Trainer(copy.deepcopy(model), processor, Accelerator(cpu=True), opts, tmp_path / "state2",
                      show_progress=False, on_step=lambda r: state.update(step=r["step"] + 1))
    with pytest.raises(TrainingDiverged, match="at step 1.*no training state was saved"):
        trainer.train(examples)


def test_plan_steps_keeps_groups_whole_and_is_deterministic():
    exs = [Example("sft", f"g{i // 3}", "", "p", "t") for i in range(12)]
    steps = plan_steps(exs, batch_size=4, epochs=2, seed=0)
    assert steps == plan_steps(exs, batch_size=4, epochs=2, seed=0)
    for step in steps:
        groups = {exs[i].group for i in step}
        assert all(sum(exs[i].group == g for i in step) == 3 for g in groups)
    assert sorted(i for s in steps for i in s) == sorted(list(range(12)) * 2)


def test_lora_trains_adapters_only_and_merges(model_and_examples, tmp_path):
    import copy

    from r3v_fast.engine.trainer import apply_lora

    model, processor, examples = model_and_examples
    base = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    opts = TrainOptions(epochs=2, lr=1e-2, batch_size=64, max_tokens=4096, lora_r=4, lora_alpha=8,
                        lora_dropout=0.0, save_every=0, warmup_steps=1)
    lora = apply_lora(base, opts)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all("language_model" in n for n in trainable)            # the vision tower stays frozen
    trainer = Trainer(lora, processor, Accelerator(cpu=True), opts, tmp_path / "state", show_progress=False)
    history = trainer.train(examples)["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    merged = trainer.model.merge_and_unload()
    after = dict(merged.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert changed and all("language_model" in n for n in changed)


def test_a_resumed_state_takes_the_new_learning_rate_and_schedule():
    """--resume --lr / --lr-scheduler after a saved state: the loaded optimizer and schedule keep
    their position (step 6 of 12) but run at the new peak and shape. Hand-computed: the 7th
    step of a linear schedule with 4 warm-up steps over 12 runs at (12 - 7) / 8 of the peak."""
    from r3v_fast.config import TrainOptions
    from r3v_fast.engine.trainer import lr_schedule, resumed_hyperparameters

    param = torch.nn.Parameter(torch.zeros(1))
    old = torch.optim.AdamW([param], lr=1.0, weight_decay=0.0)
    old_schedule = lr_schedule(old, "cosine", warmup_steps=4, total_steps=12)
    for _ in range(6):
        old.step()
        old_schedule.step()
    saved = {"optimizer": old.state_dict(), "scheduler": old_schedule.state_dict()}

    options = TrainOptions(lr=0.5, lr_scheduler="linear", warmup_steps=4, weight_decay=0.01)
    new = torch.optim.AdamW([param], lr=options.lr, weight_decay=options.weight_decay)
    schedule = lr_schedule(new, options.lr_scheduler, options.warmup_steps, 12)
    new.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    assert new.param_groups[0]["lr"] != 0.5 * 5 / 8            # the saved rate came back with the state
    resumed_hyperparameters(new, schedule, options)
    assert new.param_groups[0]["lr"] == pytest.approx(0.5 * 5 / 8)
    assert new.param_groups[0]["weight_decay"] == 0.01
    new.step()
    schedule.step()
    assert new.param_groups[0]["lr"] == pytest.approx(0.5 * 4 / 8)   # the 8th step


# --------------------------------------------------------------------------- the saved state
class Killed(BaseException):
    """A kill -9 stand-in: no handler catches it, so nothing is saved on the way out."""


def _state_trainer(model, processor, state_dir, **options):
    import copy

    opts = TrainOptions(epochs=2, lr=1e-2, batch_size=3, max_tokens=4096, lora_r=0, save_every=1, warmup_steps=1,
                        **options)
    return Trainer(copy.deepcopy(model), processor, Accelerator(cpu=True), opts, state_dir, show_progress=False,
                   log=lambda *a: None)


def _trainer_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("window", ["before the pointer switch", "before the old state is removed"])
def test_a_kill_while_saving_keeps_a_state_to_resume_from(model_and_examples, tmp_path, monkeypatch, window):
    """Steps are saved after every step (4 steps: 2 groups, 2 epochs). The save after step 2 is
    killed either once its folder is written but before current.json points to it, or right
    after the switch, before the older folder is removed. The resumed run continues from step 1
    or 2, not 0, and ends at the uninterrupted run's weights."""
    from r3v_fast.engine import rundir as rundir_module
    from r3v_fast.engine import trainer as trainer_module

    model, processor, examples = model_and_examples
    straight = _state_trainer(model, processor, tmp_path / "straight")
    assert straight.train(examples)["steps"] == 4
    expected = _trainer_weights(straight)

    state = tmp_path / "state"
    real_write, real_rmtree = rundir_module.atomic_write_text, trainer_module.shutil.rmtree

    def write(path, text):
        if window == "before the pointer switch" and '"step": 2' in text:
            raise Killed
        real_write(path, text)

    def rmtree(path, *args, **kwargs):
        if window == "before the old state is removed" and "step_0000001" in str(path):
            raise Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(rundir_module, "atomic_write_text", write)
    monkeypatch.setattr(trainer_module.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        _state_trainer(model, processor, state).train(examples)
    monkeypatch.undo()

    saved = 1 if window == "before the pointer switch" else 2
    assert json.loads((state / "current.json").read_text())["step"] == saved
    resumed = _state_trainer(model, processor, state)
    history = resumed.train(examples)["history"]
    assert [r["step"] for r in history] == list(range(saved, 4))         # not from step 0
    for name, value in _trainer_weights(resumed).items():
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name


class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears if the pickle is run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_the_saved_optimizer_state_is_refused(model_and_examples, tmp_path, monkeypatch):
    from r3v_fast.engine import trainer as trainer_module
    from r3v_fast.engine.trainer import TrainStateError

    model, processor, examples = model_and_examples
    state = tmp_path / "state"
    real_step = trainer_module.Trainer._step

    def killed_at_step_1(self, wrapper, optimizer, scheduler, step_batch, step):
        if step == 1:
            raise KeyboardInterrupt                # Ctrl-C: the state of step 1 is saved
        return real_step(self, wrapper, optimizer, scheduler, step_batch, step)

    monkeypatch.setattr(trainer_module.Trainer, "_step", killed_at_step_1)
    with pytest.raises(KeyboardInterrupt):
        _state_trainer(model, processor, state).train(examples)
    monkeypatch.undo()
    folder = state / json.loads((state / "current.json").read_text())["dir"]

    # The payload works: a plain unpickler creates its marker.
    probe = tmp_path / "probe.pt"
    torch.save(_Payload(tmp_path / "probe-ran"), probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    marker = tmp_path / "payload-ran"
    torch.save(_Payload(marker), folder / "optimizer.pt")
    with pytest.raises(TrainStateError, match=r"optimizer\.pt: refused to load: not a plain tensor file") as refused:
        _state_trainer(model, processor, state).train(examples)
    assert "weights_only" not in str(refused.value) and "safe_globals" not in str(refused.value)   # no advice
    assert "Unsupported global: GLOBAL io.open" in str(refused.value)                      # to load it anyway
    assert not marker.exists()


def test_lora_adapters_start_from_the_seed_whatever_the_global_random_state(model_and_examples):
    """Every rank (and every run) must start from the same adapters: under FSDP each rank keeps
    its own shard of what it initialised."""
    import copy

    from r3v_fast.engine.trainer import apply_lora

    model, _, _ = model_and_examples
    opts = TrainOptions(lora_r=4, lora_alpha=8)
    adapters = []
    for global_seed in (1, 2):
        untouched = torch.rand(1, generator=torch.Generator().manual_seed(global_seed))
        torch.manual_seed(global_seed)
        lora = apply_lora(copy.deepcopy(model), opts, seed=7)
        adapters.append({n: p.detach().clone() for n, p in lora.named_parameters() if "lora_A" in n})
        assert torch.equal(torch.rand(1), untouched)                      # the global state is left alone
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])
    assert any(bool(v.abs().sum()) for v in adapters[0].values())          # drawn, not zeros
    other = apply_lora(copy.deepcopy(model), opts, seed=8)
    assert not all(torch.equal(adapters[0][n], p.detach()) for n, p in other.named_parameters() if n in adapters[0])
