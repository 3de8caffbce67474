"""sequence_logprobs / TargetLogprobs against separate, unpacked Hugging Face forwards.

Reference (computed here, independently of the package): for each example on its own, the
processor's inputs + target tokens + end-of-turn through plain ``model(...).logits`` of a second
copy of the model left at SDPA attention, float64 log-softmax, gather, sum. Tree-packed and
padded ("none") results must match it per example within 1e-5 relative error in fp32, and so
must the parameter gradients of the summed log-likelihood. Models: tiny random Qwen2-VL and
LLaVA; images: real RGB files of different sizes; examples: realistic R³V sets per question.
"""

import pytest
import torch
from PIL import Image

from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.examples import Example, tokenize_examples
from r3v_fast.engine.packing import pack
from r3v_fast.model.loading import end_of_turn_id, load_vlm
from r3v_fast.engine.scoring import TargetLogprobs, sequence_logprobs

RTOL = 1e-5


def r3v_examples(processor, record):
    """SFT, refine, two selects (sharing the candidates' prefix) and a warm-up example."""
    render = lambda m: prompts.render(processor, m)   # noqa: E731
    right = f"I count the red objects one by one.\nThere are {record.answer} of them.\nAnswer: {record.answer}"
    wrong = "I count 3 red objects.\nAnswer: 3"
    wrong2 = "There is 1 red circle.\nAnswer: 1"
    return [
        Example("sft", record.id, record.image, render(prompts.cot_messages(record)), right, record.id),
        Example("refine", record.id, record.image, render(prompts.refine_messages(record, wrong)), right, record.id),
        Example("select", record.id, record.image, render(prompts.select_messages(record, [right, wrong, wrong2])),
                prompts.answer_line(record.answer), record.id),
        Example("select", record.id, record.image, render(prompts.select_messages(record, [right, wrong2, right])),
                prompts.answer_line(record.answer), record.id),
        Example("warmup", record.id, record.image, render(prompts.cot_messages(record)),
                prompts.answer_line(record.answer), record.id),
    ]


@pytest.fixture(scope="module", params=["qwen2vl", "llava"])
def setup(request, tiny_qwen2vl_dir, tiny_llava_dir, rgb_images, tmp_path_factory):
    directory = tiny_qwen2vl_dir if request.param == "qwen2vl" else tiny_llava_dir
    model, processor = load_vlm(directory)
    reference_model, _ = load_vlm(directory)
    folder = tmp_path_factory.mktemp(f"scoring_{request.param}")
    examples = []
    for i, image in enumerate(rgb_images[:2]):   # 112x112 and 84x140: different Qwen2-VL grids
        path = str(folder / f"{i}.png")
        image.save(path)
        record = Record(id=f"q{i}", image=path, question=f"How many red objects are there? ({i})",
                        answer=str(i + 2), dataset="shapes-math")
        examples += r3v_examples(processor, record)
    return request.param, model, reference_model, processor, examples


_reference_cache: dict = {}


def reference_logprob(model, processor, ex):
    """Σ log p(target + end-of-turn) from one plain HF forward of this example alone."""
    encoded = processor(text=[ex.prompt], images=[Image.open(ex.image).convert("RGB")], return_tensors="pt")
    target = processor.tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [end_of_turn_id(processor)]
    ids = torch.cat([encoded["input_ids"][0], torch.tensor(target)])[None]          # [1, L]
    extra = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:   # text tokens: type 0
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"],
                                                torch.zeros(1, len(target), dtype=torch.long)], dim=1)
    logp = model(input_ids=ids, **extra).logits[0].double().log_softmax(-1)       # [L, V]
    L, n = ids.shape[1], len(target)
    return logp[L - n - 1: L - 1].gather(-1, ids[0, L - n:, None]).sum()


def assert_matches_reference(got, model, processor, examples):
    for ex in examples:   # each example's reference is computed once per model
        if (id(model), ex) not in _reference_cache:
            with torch.no_grad():
                _reference_cache[id(model), ex] = reference_logprob(model, processor, ex)
    expected = torch.stack([_reference_cache[id(model), ex] for ex in examples])
    assert got.shape == (len(examples),) and got.dtype == torch.float32
    rel = ((got.double() - expected).abs() / expected.abs()).max().item()
    assert rel <= RTOL, f"max relative error {rel:.2e}"


@pytest.mark.parametrize("packing", ["tree", "none"])
def test_logprobs_equal_separate_forwards(setup, packing):
    kind, model, reference_model, processor, examples = setup
    with torch.no_grad():
        got = sequence_logprobs(model, processor, examples, packing=packing)
    assert_matches_reference(got, reference_model, processor, examples)


def test_tree_row_shares_prefixes_and_holds_each_image_once(setup):
    kind, model, reference_model, processor, examples = setup
    tokenized, _ = tokenize_examples(processor, examples, max_length=10_000)
    batch, = pack(tokenized, mode="tree", max_tokens=10_000)
    assert batch.n_slots < 0.6 * batch.n_example_tokens
    if kind == "qwen2vl":   # two images of different sizes in one row, once each
        grids = batch.image_inputs["image_grid_thw"]
        assert grids.shape == (2, 3) and not torch.equal(grids[0], grids[1])
    else:
        assert batch.image_inputs["pixel_values"].shape[0] == 2


def test_gradients_equal_separate_forwards(setup):
    kind, model, reference_model, processor, examples = setup
    tokenized, _ = tokenize_examples(processor, examples, max_length=10_000)
    wrapper = TargetLogprobs(model)
    model.zero_grad()
    for batch in pack(tokenized, mode="tree", max_tokens=10_000):
        logp, n_tokens = wrapper(batch)
        logp.sum().backward()
        assert n_tokens.tolist() == [tokenized[i].n_target for i in batch.example_index.tolist()]
    reference_model.zero_grad()
    torch.stack([reference_logprob(reference_model, processor, ex) for ex in examples]).sum().backward()
    reference = dict(reference_model.named_parameters())
    # Gradients that vanish in exact arithmetic (e.g. key biases: softmax ignores a per-query
    # constant) are pure rounding noise on both sides; they are left out by a relative floor.
    scale = max(p.grad.abs().max() for p in reference.values() if p.grad is not None)
    checked = 0
    for name, p in model.named_parameters():
        g, ref = p.grad, reference[name].grad
        if ref is None or not ref.abs().max() > 1e-6 * scale:
            continue
        err = (g - ref).abs().max() / ref.abs().max()
        assert err <= RTOL, f"{name}: gradient relative error {err:.2e}"
        checked += 1
    assert checked > 10   # vision tower, projector, decoder and head all receive gradients


@pytest.mark.parametrize("packing", ["tree", "none"])
def test_naive_loss_equals_fused_values_and_gradients(setup, packing):
    """The full-logits baseline (--loss naive) and the fused op agree on the tiny models, in the
    per-example log-likelihoods and in every parameter's gradient."""
    kind, model, reference_model, processor, examples = setup
    tokenized, _ = tokenize_examples(processor, examples, max_length=10_000)
    results = {}
    for loss in ("fused", "naive"):
        wrapper = TargetLogprobs(model, loss=loss)
        model.zero_grad()
        values = []
        for batch in pack(tokenized, mode=packing, max_tokens=10_000):
            logp, _ = wrapper(batch)
            (logp * torch.linspace(0.5, 1.5, len(logp))).sum().backward()   # unequal example weights
            values.append(logp.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[loss] = torch.cat(values), grads
    (fused, fused_grads), (naive, naive_grads) = results["fused"], results["naive"]
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == naive_grads.keys() and len(fused_grads) > 10
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], naive_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="unknown loss"):
        TargetLogprobs(model, loss="chunked")


@pytest.mark.parametrize("loss", ["fused", "naive"])
def test_known_example_weights_give_the_weighted_loss_and_its_gradients(setup, loss):
    """With the trainer's example weights the wrapper returns -Σ w·logp (fused: weighted_nll,
    gradients formed in the forward) and the detached logp: equal to weighting the plain
    per-example log-likelihoods, in value and in every gradient."""
    kind, model, reference_model, processor, examples = setup
    tokenized, _ = tokenize_examples(processor, examples, max_length=10_000)
    batch, = pack(tokenized, mode="tree", max_tokens=10_000)
    weights = torch.linspace(0.25, 2.0, batch.n_examples)
    wrapper = TargetLogprobs(model, loss=loss)
    model.zero_grad()
    logp, _ = wrapper(batch)
    expected = -(weights * logp).sum()
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got, got_logp, n_tokens = wrapper(batch, weights)
    got.backward()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logp, logp.detach(), rtol=1e-5, atol=1e-5)
    assert not got_logp.requires_grad and n_tokens.tolist() == batch.n_target_tokens.tolist()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_edge_cases(setup):
    """One example per trie; identical examples; an example that is a prefix of another; tries
    that fill a row exactly."""
    kind, model, reference_model, processor, examples = setup
    sft_a, refine_a, sft_b = examples[0], examples[1], examples[5]
    eot = processor.tokenizer.convert_ids_to_tokens(end_of_turn_id(processor))
    follow_up = ("\n<|im_start|>user\nAre you sure?<|im_end|>\n<|im_start|>assistant\n" if kind == "qwen2vl"
                 else "USER: Are you sure? ASSISTANT:")
    longer = Example("sft", sft_a.group, sft_a.image, sft_a.prompt + sft_a.target + eot + follow_up,
                     "Yes.", sft_a.question_id)
    short_ids, long_ids = (t.input_ids.tolist() for t in
                           tokenize_examples(processor, [sft_a, longer], max_length=10_000)[0])
    assert long_ids[: len(short_ids)] == short_ids, "precondition: a prefix example"
    cases = {
        "one example per trie": [sft_a, sft_b],
        "identical examples": [sft_a, refine_a, sft_a],
        "prefix of another": [longer, sft_a, refine_a],
    }
    for name, case in cases.items():
        with torch.no_grad():
            got = sequence_logprobs(model, processor, case, packing="tree")
        assert_matches_reference(got, reference_model, processor, case)

    # Tries that fill a row exactly: the budget is the two tries' sizes together.
    exs = examples[:5] + examples[5:7]
    tokenized, _ = tokenize_examples(processor, exs, max_length=10_000)
    budget = sum(pack([t for t in tokenized if t.group == g], mode="tree", max_tokens=10_000)[0].n_slots
                 for g in ("q0", "q1"))
    batches = pack(tokenized, mode="tree", max_tokens=budget)
    assert [b.n_slots for b in batches] == [budget]
    with torch.no_grad():
        got = sequence_logprobs(model, processor, exs, packing="tree", max_tokens=budget)
    assert_matches_reference(got, reference_model, processor, exs)


def test_over_long_examples_raise_with_the_question(setup):
    kind, model, reference_model, processor, examples = setup
    shortest = min(len(t) for t in tokenize_examples(processor, examples, max_length=10_000)[0])
    with pytest.raises(ValueError, match=r"longer than max_tokens.*'q0'"):
        sequence_logprobs(model, processor, examples, max_tokens=shortest)


def test_qwen2_5vl_tree_logprobs_equal_separate_forwards(tiny_qwen2_5vl_dir, rgb_images, tmp_path):
    model, processor = load_vlm(tiny_qwen2_5vl_dir)
    reference_model, _ = load_vlm(tiny_qwen2_5vl_dir)
    path = str(tmp_path / "q.png")
    rgb_images[1].save(path)
    examples = r3v_examples(processor, Record(id="q0", image=path, question="How many red objects are there?",
                                              answer="2", dataset="shapes-math"))
    with torch.no_grad():
        got = sequence_logprobs(model, processor, examples, packing="tree")
    assert_matches_reference(got, reference_model, processor, examples)


def test_tree_batches_switch_the_decoder_back_to_tree_attention(setup):
    kind, model, reference_model, processor, examples = setup
    wrapper = TargetLogprobs(model)
    language_model = model.model.language_model
    language_model.set_attn_implementation("sdpa")      # e.g. left so by another component
    batch, = pack(tokenize_examples(processor, examples[:5], max_length=10_000)[0], mode="tree", max_tokens=10_000)
    with torch.no_grad():
        got = torch.zeros(5).index_put((batch.example_index,), wrapper(batch)[0])
    assert model.config.get_text_config()._attn_implementation == "r3v_tree"
    assert_matches_reference(got, reference_model, processor, examples[:5])


def test_public_import_path_reexports_the_engine_functions():
    import r3v_fast.scoring as public

    assert public.sequence_logprobs is sequence_logprobs and public.TargetLogprobs is TargetLogprobs
