"""Tests for r3v_fast.integrations.apply_fused_loss on tiny random transformers models (CPU, fp32).

Each model is built here from its config (Llama, Qwen2 with tied embeddings, Qwen2-VL and
Qwen2.5-VL text-only and with an image, LLaVA with an image); the patched copy must give the
unpatched model's loss and parameter gradients (rel 1e-5), logits=None, and a Trainer must
step with it. The loss (weighted_nll with weights 1/n) must also give the gradients of the
earlier token_logprob path under an upstream gradient other than 1.

The drop-ins as a user runs them: ``Trainer.evaluate`` / ``predict`` with ``compute_metrics``
(eval mode gets the real logits), peft with ``modules_to_save=["lm_head"]`` and with LoRA on
``lm_head`` (dropout on), ``merge_and_unload``, the small-head dispatch rule, and TRL's
SFTTrainer and DPOTrainer (skipped without TRL): a few steps each, patched after the trainer is
built, must log the unpatched run's losses and metrics while our op does the work. These
models are tiny (hidden 32, vocabulary 96), below the small-head fallback, so tests that check
the fused path turn the fallback off.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers

from r3v_fast.integrations import apply_fused_loss, causal_lm_loss, remove_fused_loss

VOCAB, WIDTH = 96, 32
IMAGE, VISION_START, VISION_END = 90, 91, 92  # token ids reserved for the image placeholders


def _text(**extra):
    return dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)


def _qwen_vl_config(config_class, vision):
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])  # head_dim 8
    return config_class(text_config=_text(rope_parameters=rope), vision_config=dict(
        vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2), image_token_id=IMAGE,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, video_token_id=93)


def build(kind: str):
    """(model, extra inputs for one image) for a tiny random model of the given family."""
    tf = transformers
    if kind == "llama":
        config, cls = tf.LlamaConfig(**_text()), tf.LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = tf.Qwen2Config(**_text(tie_word_embeddings=True)), tf.Qwen2ForCausalLM
    elif kind == "qwen2_vl":
        config = _qwen_vl_config(tf.Qwen2VLConfig, dict(depth=1, embed_dim=16, num_heads=2, mlp_ratio=2,
                                                        hidden_size=WIDTH))
        cls = tf.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        config = _qwen_vl_config(tf.Qwen2_5_VLConfig, dict(depth=1, hidden_size=16, num_heads=2,
                                                           intermediate_size=32, out_hidden_size=WIDTH,
                                                           window_size=56, fullatt_block_indexes=[0]))
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif kind == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=28, patch_size=14)
        config = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**_text()), image_token_index=IMAGE)
        cls = tf.LlavaForConditionalGeneration
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = cls(config).train()  # the patch fuses in training mode; dropout is 0 in these configs
    return model


@pytest.fixture
def fuse_any_vocabulary(monkeypatch):
    """The README's lines as written (no setting) on these tiny-vocabulary models: the
    small-head fallback threshold set to 0."""
    import r3v_fast.integrations as integrations

    monkeypatch.setattr(integrations, "CPU_FUSED_MIN_VOCAB", 0)


def fused(model, **kwargs):
    """apply_fused_loss with the small-head fallback off: these models are far below it."""
    return apply_fused_loss(model, small_head_fallback=False, **kwargs)


def make_batch(kind: str, with_image: bool, seed: int = 0):
    """input_ids [2, 16] (row 1 left-padded), attention_mask, labels (-100 on prompt and padding)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 80, (2, 16), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    labels = input_ids.clone()
    labels[:, :7] = -100
    labels[attention_mask == 0] = -100
    extra = {}
    if with_image and kind in ("qwen2_vl", "qwen2_5_vl"):
        # a 56x56 image: 4x4 patches of 14 px, merged 2x2 into 4 image tokens
        input_ids[:, 3:9] = torch.tensor([VISION_START, IMAGE, IMAGE, IMAGE, IMAGE, VISION_END])
        extra = dict(pixel_values=torch.randn(2 * 16, 3 * 2 * 14 * 14, generator=g),
                     image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
        if "mm_token_type_ids" in inspect.signature(transformers.Qwen2VLForConditionalGeneration.forward).parameters:
            extra["mm_token_type_ids"] = (input_ids == IMAGE).int()  # 1 = image token (newer transformers)
    elif with_image and kind == "llava":
        input_ids[:, 3:7] = IMAGE  # a 28x28 image: 2x2 patches, one token each
        extra = dict(pixel_values=torch.randn(2, 3, 28, 28, generator=g))
    labels[input_ids >= IMAGE] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


CASES = [("llama", False), ("qwen2", False), ("qwen2_vl", False), ("qwen2_vl", True), ("qwen2_5_vl", True),
         ("llava", True)]


@pytest.mark.parametrize("kind,with_image", CASES, ids=[f"{k}{'-image' if i else ''}" for k, i in CASES])
def test_patched_model_matches_unpatched_loss_and_gradients(kind, with_image):
    model = build(kind)
    patched = fused(copy.deepcopy(model), backend="torch")
    batch = make_batch(kind, with_image)
    ref, ref_grads = loss_and_grads(model, batch)
    out, grads = loss_and_grads(patched, batch)
    assert out.logits is None and "logits" not in out
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_num_items_in_batch_shift_labels_tuple_output_and_no_labels():
    model = build("llama")
    patched = fused(copy.deepcopy(model))
    batch = make_batch("llama", False)
    n_items = torch.tensor(37)
    ref = model(**batch, num_items_in_batch=n_items).loss
    torch.testing.assert_close(patched(**batch, num_items_in_batch=n_items).loss, ref, rtol=1e-5, atol=0)
    # positional input_ids, tuple output: (loss, past_key_values, ...) with no logits
    plain = {k: v for k, v in batch.items() if k != "input_ids"}
    as_tuple = patched(batch["input_ids"], **plain, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], model(**batch).loss, rtol=1e-5, atol=0)
    assert len(as_tuple) == 1
    # explicit shift_labels, no labels
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(patched(**unlabelled, shift_labels=shifted).loss, model(**batch).loss,
                               rtol=1e-5, atol=0)
    # without labels the original forward runs: real logits
    torch.testing.assert_close(patched(**unlabelled).logits, model(**unlabelled).logits)
    assert remove_fused_loss(patched).forward.__func__ is type(patched).forward


def _token_logprob_causal_loss(hidden, weight, labels, bias, num_items_in_batch, backend):
    """The path apply_fused_loss took before weighted_nll: -Σ token_logprob / denominator."""
    from r3v_fast.ops import token_logprob

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    total = -token_logprob(hidden, weight, shifted, bias=bias, backend=backend).sum()
    return total / ((shifted != -100).sum() if num_items_in_batch is None else num_items_in_batch)


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(37)], ids=["mean", "num_items"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_causal_lm_loss_gradients_match_the_token_logprob_path(backend, num_items_in_batch):
    from r3v_fast.ops import cpp_backend

    if backend == "cpp" and not cpp_backend.available():
        pytest.skip("r3v_fast._C is not built")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, WIDTH, generator=g)
    weight = torch.randn(VOCAB, WIDTH, generator=g) / WIDTH ** 0.5
    bias = torch.randn(VOCAB, generator=g)
    labels = make_batch("llama", False)["labels"]
    results = []
    for loss_fn in (causal_lm_loss, _token_logprob_causal_loss):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        if loss_fn is causal_lm_loss:
            loss = loss_fn(leaves[0], leaves[1], labels, bias=leaves[2], num_items_in_batch=num_items_in_batch,
                           backend=backend)
        else:
            loss = loss_fn(leaves[0], leaves[1], labels, leaves[2], num_items_in_batch, backend)
        (loss * 0.7).backward()  # an upstream gradient other than 1 (e.g. gradient accumulation)
        results.append((loss.detach(), *(t.grad for t in leaves)))
    for name, new, old in zip(("loss", "d_hidden", "d_weight", "d_bias"), *results):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6 * old.abs().max().item(), msg=name)


def test_causal_lm_loss_is_nan_without_targets_like_cross_entropy():
    hidden, weight = torch.randn(1, 4, 8), torch.randn(10, 8)
    assert torch.isnan(causal_lm_loss(hidden, weight, torch.full((1, 4), -100)))


def test_refuses_models_it_cannot_patch():
    model = build("llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        apply_fused_loss(model)
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="LM head of LlamaForCausalLM is a torch.nn.modules.container.Sequential"):
        apply_fused_loss(model)


def test_trainer_steps_with_patched_model(tmp_path, fuse_any_vocabulary):
    model = apply_fused_loss(build("llama"))
    examples = [{k: v[i] for k, v in make_batch("llama", False, seed=s).items()} for s in range(2) for i in range(2)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    before = model.lm_head.weight.detach().clone()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.lm_head.weight)


# ---------------------------------------------------------------- evaluate / predict
_PER_IMAGE = ("pixel_values", "image_grid_thw")  # Qwen-VL: patches of all images in a batch, concatenated


def _examples(kind: str, with_image: bool, seeds=(0, 1)):
    """The rows of make_batch as single examples (a Qwen-VL image's 16 patch rows go with its row)."""
    examples = []
    for seed in seeds:
        batch = make_batch(kind, with_image, seed=seed)
        for i in range(2):
            example = {k: v[i] for k, v in batch.items()}
            if "image_grid_thw" in batch:
                example.update(pixel_values=batch["pixel_values"][16 * i:16 * (i + 1)],
                               image_grid_thw=batch["image_grid_thw"][i:i + 1])
            examples.append(example)
    return examples


def _collate(examples):
    return {k: torch.cat([e[k] for e in examples]) if k in _PER_IMAGE and "image_grid_thw" in examples[0]
            else torch.stack([e[k] for e in examples]) for k in examples[0]}


def _token_accuracy(eval_pred):
    """compute_metrics of a user: next-token accuracy on the target tokens, from the logits."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):  # Qwen2-VL also returns its rope deltas: the logits come first
        logits = logits[0]
    predicted, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
    keep = targets != -100
    return {"token_accuracy": float((predicted[keep] == targets[keep]).mean())}


@pytest.mark.parametrize("kind,with_image", [("qwen2", False), ("qwen2_vl", True)], ids=["qwen2", "qwen2_vl-image"])
def test_evaluate_and_predict_with_compute_metrics_see_the_real_logits(kind, with_image, tmp_path):
    model = build(kind)
    patched = fused(copy.deepcopy(model))
    examples = _examples(kind, with_image)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    results = []
    for m in (model, patched):
        trainer = transformers.Trainer(model=m, args=args, eval_dataset=examples, data_collator=_collate,
                                       compute_metrics=_token_accuracy)
        results.append((trainer.evaluate(), trainer.predict(examples)))
    (ref_metrics, ref_pred), (metrics, pred) = results
    predictions = pred.predictions if isinstance(pred.predictions, tuple) else (pred.predictions,)
    ref_predictions = ref_pred.predictions if isinstance(ref_pred.predictions, tuple) else (ref_pred.predictions,)
    assert predictions[0].shape == (4, 16, VOCAB)  # the logits, not the vision tower's output
    assert [type(p) for p in predictions] == [type(p) for p in ref_predictions]
    torch.testing.assert_close(torch.as_tensor(predictions[0]), torch.as_tensor(ref_predictions[0]))
    for name in ("eval_loss", "eval_token_accuracy"):
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-6), name
    # the same examples in training mode: the fused loss, no logits
    batch = make_batch(kind, with_image)
    assert patched.train()(**batch).logits is None


# ---------------------------------------------------------------- the small-head fallback
def test_small_head_dispatch_rule():
    from r3v_fast.integrations import CPU_FUSED_MIN_VOCAB, uses_fused_path

    small, large = torch.nn.Linear(8, CPU_FUSED_MIN_VOCAB - 1), torch.nn.Linear(8, CPU_FUSED_MIN_VOCAB)
    assert not uses_fused_path(small) and uses_fused_path(large)
    assert uses_fused_path(small, small_head_fallback=False)
    assert uses_fused_path(torch.nn.Linear(8, 4, device="meta"))  # the rule is for CPU heads only
    # a patched model below the rule takes the plain path: HF's loss, with the logits
    model = build("llama")
    assert VOCAB < CPU_FUSED_MIN_VOCAB
    patched = apply_fused_loss(copy.deepcopy(model))
    batch = make_batch("llama", False)
    out = patched(**batch)
    torch.testing.assert_close(out.logits, model(**batch).logits)
    assert fused(patched)(**batch).logits is None  # re-applying updates the setting


# ---------------------------------------------------------------- peft
def _peft_copy(model, **lora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, **lora))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:  # peft starts B at 0; a random B makes the adapter visible in the logits
            torch.nn.init.normal_(p, std=0.1)
    return wrapped


def _seeded_loss_and_grads(model, batch):
    torch.manual_seed(7)  # the same LoRA-dropout draw in both models
    return loss_and_grads(model, batch)


@pytest.mark.parametrize("lora", [dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
                                  dict(target_modules=["q_proj", "lm_head"], lora_dropout=0.25)],
                         ids=["modules_to_save", "lora_on_lm_head"])
def test_peft_head_matches_unpatched_loss_and_gradients(lora, fuse_any_vocabulary):
    reference = _peft_copy(build("llama"), **lora)
    patched = apply_fused_loss(copy.deepcopy(reference))
    batch = make_batch("llama", False)
    ref, ref_grads = _seeded_loss_and_grads(reference, batch)
    out, grads = _seeded_loss_and_grads(patched, batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    head_grads = [name for name in grads if "lm_head" in name]
    assert head_grads  # the head's trainable copy / adapter is trained
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_merge_and_unload_keeps_a_correct_patch(fuse_any_vocabulary):
    reference = _peft_copy(build("llama"), target_modules=["q_proj", "lm_head"])
    patched = apply_fused_loss(copy.deepcopy(reference))
    merged_ref, merged = reference.merge_and_unload(), patched.merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear
    batch = make_batch("llama", False)
    out = merged(**batch)
    assert out.logits is None  # still patched: documented in the README
    torch.testing.assert_close(out.loss, merged_ref(**batch).loss, rtol=1e-5, atol=0)
    assert remove_fused_loss(merged)(**batch).logits is not None


# ---------------------------------------------------------------- TRL
def _trl_setup():
    """(trl, datasets, tokenizer, a tiny Qwen2 with the embedded tokenizer's vocabulary)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from r3v_fast.model.tiny import PACKAGED_MODEL  # the embedded tiny model: its tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(PACKAGED_MODEL)
    config = transformers.Qwen2Config(**{**_text(), "vocab_size": len(tokenizer)}, tie_word_embeddings=False)
    torch.manual_seed(0)
    return trl, datasets, tokenizer, transformers.Qwen2ForCausalLM(config)


def _trl_train(trainer_class, config_class, model, patch: bool, monkeypatch, tmp_path, **trainer_kwargs):
    """Two steps; returns (the logged rows, how often r3v_fast's token_logprob ran)."""
    import r3v_fast.integrations as integrations

    args = config_class(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
                        seed=0, bf16=False)  # fp32: bf16 autocast would round TRL's own head, not ours
    if "ref_model" in trainer_kwargs:  # DPO: a frozen copy of the starting model
        trainer_kwargs["ref_model"] = copy.deepcopy(trainer_kwargs["ref_model"])
    trainer = trainer_class(model=copy.deepcopy(model), args=args, **trainer_kwargs)
    calls = []
    if patch:  # the README's lines: patch after the trainer is built
        apply_fused_loss(trainer.model)  # (TRL's fused_lm_head calls are fused whatever the vocabulary)
        if getattr(trainer, "ref_model", None) is not None:
            apply_fused_loss(trainer.ref_model)
        original = integrations.token_logprob
        monkeypatch.setattr(integrations, "token_logprob", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row], len(calls)


def _assert_same_logs(logs, reference, keys):
    assert len(logs) == len(reference) == 2
    for row, ref in zip(logs, reference):
        for key in keys:
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (key, row, ref)


def test_trl_sft_trainer_runs_our_op_with_the_unpatched_losses_and_metrics(monkeypatch, tmp_path):
    trl, datasets, tokenizer, model = _trl_setup()
    data = datasets.Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."}
                                       for i in range(8)])
    runs = [_trl_train(trl.SFTTrainer, trl.SFTConfig, model, patch, monkeypatch, tmp_path / str(patch),
                       train_dataset=data, processing_class=tokenizer) for patch in (False, True)]
    (reference, no_calls), (logs, calls) = runs
    assert no_calls == 0 and calls == 2  # one fused forward per step, through r3v_fast
    _assert_same_logs(logs, reference, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def test_trl_dpo_trainer_runs_our_op_with_the_unpatched_losses_and_metrics(monkeypatch, tmp_path):
    trl, datasets, tokenizer, model = _trl_setup()
    data = datasets.Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                                        "rejected": f" It is {2 * i + 1}."} for i in range(8)])
    runs = [_trl_train(trl.DPOTrainer, trl.DPOConfig, model, patch, monkeypatch, tmp_path / str(patch),
                       train_dataset=data, processing_class=tokenizer, ref_model=model) for patch in (False, True)]
    (reference, no_calls), (logs, calls) = runs
    assert no_calls == 0 and calls >= 4  # policy and reference log-probabilities, each step
    keys = [k for k in reference[0] if k.startswith(("rewards/", "logps/", "logits/")) or k in
            ("loss", "grad_norm", "entropy", "mean_token_accuracy")]
    assert {"loss", "rewards/chosen", "logps/chosen", "entropy", "mean_token_accuracy"} <= set(keys)
    _assert_same_logs(logs, reference, keys)


def test_trl_fused_lm_head_fields_against_a_float64_reference():
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = build("qwen2")
    reference = copy.deepcopy(model)
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    add_fused_lm_head(model, outputs=fields)  # what TRL's trainers do in their constructor
    apply_fused_loss(model)
    batch = make_batch("qwen2", False)
    out = model(**batch, fused_lm_head=True)
    with torch.no_grad():
        logits = reference(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits.log_softmax(-1)  # [B, S-1, V] float64
    expected = {
        "log_probs": logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0],
        "entropy": -(logp.exp() * logp).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logp, dim=-1),
        "mean_logits": logits.mean(-1),
        "is_top1": (logits.argmax(-1) == labels).double(),
    }
    for name, want in expected.items():
        torch.testing.assert_close(getattr(out, name).double(), want * mask, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(out.label_mask, mask)
    torch.testing.assert_close(out.loss.double(), -expected["log_probs"][mask].mean(), rtol=1e-5, atol=0)
    out.loss.backward()  # the log-probabilities carry the gradient
    assert model.lm_head.weight.grad is not None


def test_trl_heads_at_another_temperature_are_refused():
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = build("llama")
    add_fused_lm_head(model, temperature=0.7)
    apply_fused_loss(model)
    with pytest.raises(ValueError, match="temperature 0.7"):
        model(**make_batch("llama", False), fused_lm_head=True)
