"""Shared-prefix samplers on tiny random Qwen2-VL and LLaVA (fp32), against plain HF references.

Every contract test runs on both schedulers: the continuous-batching ``SharedPrefixSampler``
(paged KV) and the ``GroupedPrefixSampler``. References share no code with the samplers:
``model.generate`` (greedy, one prompt at a time) for token ids, a plain teacher-forced
forward of prompt + sampled tokens (the model's own positions, M-RoPE included) for
log-probabilities, and ``HFSampler`` (transformers' warpers) for the sampling distribution.
Prompts have different lengths (different image sizes for Qwen2-VL, different questions for
both) and run in one batch. The continuous sampler's own tests follow: admission as slots
free up, preemption, KV blocks held, occupancy.
"""

import os

import pytest
import torch

from r3v_fast.data import prompts
from r3v_fast.data.records import DataError, Record
from r3v_fast.engine import evaluation
from r3v_fast.engine.sampler import HFSampler, Request, SamplingParams, load_images
from r3v_fast.engine.grouped_sampler import GroupedPrefixSampler
from r3v_fast.engine.prefix_sampling import cache_keyword
from r3v_fast.engine.shared_sampler import SharedPrefixSampler
from r3v_fast.model.loading import load_vlm, pad_id

QUESTIONS = ["How many red objects are there?",
             "Remove all circles. How many objects are left? Count the squares first.",
             "How many?"]
GREEDY = SamplingParams(k=1, temperature=0.0, max_new_tokens=12)
# Tests of sampling logic that does not depend on the model family run on Qwen2-VL only (the
# M-RoPE case); everything that involves positions or the cache runs on both families.
qwen_only = pytest.mark.parametrize("setup", ["qwen2vl"], indirect=True)
# The CPU-resident test models can run the Triton kernel only in the interpreter; on CUDA the
# kernel is covered by test_cuda_graph_decoding_equals_eager_and_generate.
try:
    import triton  # noqa: F401
    TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
except ImportError:
    TRITON_INTERPRETED = False


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is plenty, and on a busy shared machine it avoids
    OpenMP threads spinning against each other (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["qwen2vl", "llava"])
def setup(request, rgb_images, tmp_path_factory):
    model, processor = load_vlm(request.getfixturevalue(f"tiny_{request.param}_dir"))
    folder = tmp_path_factory.mktemp(f"images_{request.param}")
    records = []
    for i, (image, question) in enumerate(zip(rgb_images, QUESTIONS)):
        path = folder / f"{i}.png"
        image.save(path)
        records.append(Record(id=str(i), image=str(path), question=question, answer="1", dataset="shapes-math"))
    # Keys name the draws (as the question ids do in the R³V loop): fixed draws, whatever the
    # temporary image paths are.
    requests = [Request(prompts.render(processor, prompts.cot_messages(r)), r.image, key=r.id) for r in records]
    return model, processor, records, requests


SAMPLERS = {"continuous": SharedPrefixSampler, "grouped": GroupedPrefixSampler}


@pytest.fixture(params=list(SAMPLERS))
def kind(request):
    return request.param


def _sampler(kind, model, processor, **kwargs):
    return SAMPLERS[kind](model, processor, show_progress=False, backend="torch", **kwargs)


def _inputs(processor, request):
    return processor(text=[request.prompt], images=load_images([request]), return_tensors="pt")


@torch.no_grad()
def _generate_greedy(model, processor, request, max_new_tokens, stop_ids):
    """HF generate, greedy, this prompt alone: new token ids cut after the first stop token."""
    inputs = _inputs(processor, request)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                         pad_token_id=pad_id(processor))
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    end = next((i + 1 for i, t in enumerate(new) if t in stop_ids), len(new))
    return new[:end]


@torch.no_grad()
def _teacher_forced_logprobs(model, processor, request, tokens):
    """log p(token_t | prompt, tokens_<t) from one plain forward of prompt + tokens."""
    inputs = dict(_inputs(processor, request))
    prompt_len = inputs["input_ids"].shape[1]
    extra = torch.tensor([tokens])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:   # text tokens are type 0
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    logits = model(**inputs).logits[0, prompt_len - 1:prompt_len - 1 + len(tokens)].double()
    return torch.log_softmax(logits, -1).gather(1, extra.T).view(-1)


@pytest.mark.parametrize("setup", ["qwen2vl", "qwen2_5vl", "llava"], indirect=True)
def test_greedy_k1_equals_hf_generate_for_a_batch_of_different_lengths(setup, kind):
    model, processor, _, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3)
    lengths = {len(_inputs(processor, r)["input_ids"][0]) for r in requests}
    assert len(lengths) == 3                      # three prompt lengths in one batch
    outputs = sampler._sample_branches(requests, GREEDY)
    for request, (branch,) in zip(requests, outputs):
        expected = _generate_greedy(model, processor, request, GREEDY.max_new_tokens, sampler.stop_ids)
        assert branch.tokens == expected
        assert branch.text == processor.batch_decode([expected], skip_special_tokens=True)[0]
    # The text API agrees with HFSampler.
    hf = HFSampler(model, processor, batch_size=1, show_progress=False)
    assert sampler.sample(requests, GREEDY) == hf.sample(requests, GREEDY)


# transformers marks a keyword for removal with a FutureWarning "... is deprecated and will be
# removed in version X"; as an error here, any such call of ours fails while it still works.
@pytest.mark.filterwarnings("error:.*is deprecated and will be removed in version:FutureWarning")
@pytest.mark.parametrize("setup", ["qwen2vl", "qwen2_5vl", "llava"], indirect=True)
def test_prefill_extend_and_decode_make_no_deprecated_transformers_calls(setup, kind):
    model, processor, records, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3)

    def select_request(i, candidates):
        return Request(prompts.render(processor, prompts.select_messages(records[i], candidates)), records[i].image,
                       key=f"{records[i].id}/select{len(candidates)}")

    _, candidates, selects = evaluation.sample_and_select(
        sampler, requests, SamplingParams(k=2, temperature=1.0, max_new_tokens=4, seed=1), select_request, [2],
        SamplingParams(k=1, temperature=0.0, max_new_tokens=3))
    assert [len(c) for c in candidates] == [2, 2, 2] and len(selects[2]) == 3


def test_cache_keyword_follows_the_backbone_signature():
    class Current(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, past_key_values=None):  # 5.24: both, cache preferred
            return input_ids

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):  # 5.17
            return input_ids

    assert cache_keyword(Current()) == "cache" and cache_keyword(Older()) == "past_key_values"


@qwen_only
def test_k_greedy_branches_all_equal_the_greedy_output(setup, kind):
    model, processor, _, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3)
    single = sampler._sample_branches(requests, GREEDY)
    branches = sampler._sample_branches(requests, SamplingParams(k=4, temperature=0.0, max_new_tokens=12))
    for (expected,), got in zip(single, branches):
        assert len(got) == 4 and all(b.tokens == expected.tokens for b in got)


def test_stop_tokens_end_branches_at_different_lengths(setup, kind):
    """Early stops (a made-up stop set) with compaction every other step still give exactly
    the HF greedy tokens, cut after the stop token."""
    model, processor, _, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3, sync_every=2)
    free = [b.tokens for (b,) in sampler._sample_branches(requests, SamplingParams(k=1, temperature=0.0,
                                                                                  max_new_tokens=16))]
    stop_ids = sorted({free[0][2], free[1][6]})
    sampler.stop_ids = stop_ids
    got = [b.tokens for (b,) in sampler._sample_branches(requests, SamplingParams(k=1, temperature=0.0,
                                                                                 max_new_tokens=16))]
    expected = [_generate_greedy(model, processor, r, 16, stop_ids) for r in requests]
    assert got == expected
    assert len({len(t) for t in got}) > 1 and min(len(t) for t in got) < 16


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 0.8)])
def test_sampled_logprobs_equal_teacher_forced_logprobs(setup, top_k, top_p, kind):
    model, processor, _, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3, sync_every=3)
    sampler.stop_ids = list(range(100, 140))        # about 8% stop chance per token: ragged ends
    # A seed whose draws avoid the image placeholder token: the teacher-forced reference cannot
    # take a generated placeholder as text (the processor counts placeholders against features).
    params = SamplingParams(k=3, temperature=1.3, top_k=top_k, top_p=top_p, max_new_tokens=14, seed=6)
    outputs = sampler._sample_branches(requests, params)
    for request, branches in zip(requests, outputs):
        assert len(branches) == 3
        for branch in branches:
            assert 1 <= len(branch.tokens) <= 14 and len(branch.logprobs) == len(branch.tokens)
            assert all(t not in sampler.stop_ids for t in branch.tokens[:-1])
            expected = _teacher_forced_logprobs(model, processor, request, branch.tokens)
            got = torch.tensor(branch.logprobs, dtype=torch.float64)
            assert torch.all((got - expected).abs() <= 1e-5 * expected.abs()), (got, expected)
    assert sampler.last_stats["generated_tokens"] == sum(len(b.tokens) for bs in outputs for b in bs)


@qwen_only
def test_top_k_one_and_tiny_top_p_are_greedy(setup, kind):
    model, processor, _, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3)
    greedy = [b.tokens for (b,) in sampler._sample_branches(requests, GREEDY)]
    for params in (SamplingParams(k=2, temperature=1.0, top_k=1, max_new_tokens=12, seed=1),
                   SamplingParams(k=2, temperature=1.0, top_k=0, top_p=1e-9, max_new_tokens=12, seed=1)):
        for expected, branches in zip(greedy, sampler._sample_branches(requests, params)):
            assert [b.tokens for b in branches] == [expected, expected]


@qwen_only
def test_sampled_tokens_stay_in_the_top_k(setup, kind):
    model, processor, _, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3)
    params = SamplingParams(k=2, temperature=2.0, top_k=3, top_p=1.0, max_new_tokens=6, seed=2)
    for request, branches in zip(requests, sampler._sample_branches(requests, params)):
        for branch in branches:
            inputs = dict(_inputs(processor, request))
            prompt_len = inputs["input_ids"].shape[1]
            extra = torch.tensor([branch.tokens])
            inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            if "mm_token_type_ids" in inputs:
                inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
            with torch.no_grad():
                logits = model(**inputs).logits[0, prompt_len - 1:prompt_len - 1 + len(branch.tokens)]
            top3 = logits.topk(3, dim=-1).indices
            assert all(t in top3[i].tolist() for i, t in enumerate(branch.tokens))


def test_sampled_texts_equal_the_hf_sampler_token_for_token(setup, kind):
    """The same draw on the same distribution: with the public R³V settings the shared and HF
    samplers give the same K samples of every request (fp32, batch sizes differ on purpose)."""
    model, processor, _, requests = setup
    params = SamplingParams(k=3, temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=10, seed=11)
    shared = _sampler(kind, model, processor, batch_size=2).sample(requests, params)
    hf = HFSampler(model, processor, batch_size=3, show_progress=False).sample(requests, params)
    assert shared == hf
    assert all(len(set(texts)) > 1 for texts in shared)


@qwen_only
def test_a_requests_samples_do_not_depend_on_its_group(setup, kind):
    model, processor, _, requests = setup
    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=8, seed=7)
    together = _sampler(kind, model, processor, batch_size=3).sample(requests, params)
    reordered = _sampler(kind, model, processor, batch_size=2).sample(requests[::-1], params)[::-1]
    alone = [_sampler(kind, model, processor, batch_size=1).sample([r], params)[0] for r in requests]
    assert together == reordered == alone


@qwen_only
def test_seed_reproduces_and_changes_the_draws(setup, kind):
    model, processor, _, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=2)
    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=8, seed=7)
    first = sampler.sample(requests, params)
    assert [len(t) for t in first] == [3, 3, 3]
    assert sampler.sample(requests, params) == first
    assert sampler.sample(requests, SamplingParams(**{**params.__dict__, "seed": 8})) != first
    assert len({t for texts in first for t in texts}) > 1       # branches differ from each other


def test_select_branch_equals_from_scratch_greedy_of_the_select_prompt(setup, kind):
    model, processor, records, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=2)    # grouped: 2 + 1; continuous: 8 slots
    hf = HFSampler(model, processor, batch_size=1, show_progress=False)

    def select_request(i, candidates):
        return Request(prompts.render(processor, prompts.select_messages(records[i], candidates)), records[i].image,
                       key=f"{records[i].id}/select{len(candidates)}")

    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=10, seed=4)
    select_params = SamplingParams(k=1, temperature=0.0, max_new_tokens=8)
    greedy, candidates, selects = evaluation.sample_and_select(sampler, requests, params, select_request, [2, 3],
                                                               select_params)
    if kind == "grouped":
        assert sampler.last_stats["groups"] == 2
    assert greedy == [t[0] for t in hf.sample(requests, SamplingParams(k=1, temperature=0.0, max_new_tokens=10))]
    assert [len(c) for c in candidates] == [3, 3, 3] and sorted(selects) == [2, 3]
    for k in (2, 3):
        assert len(selects[k]) == 3
        expected = hf.sample([select_request(i, candidates[i][:k]) for i in range(3)], select_params)
        assert selects[k] == [t[0] for t in expected]
    assert all(len(set(c)) > 1 for c in candidates)


def test_select_branch_logprobs_equal_teacher_forcing_on_the_full_select_prompt(setup, kind):
    """Token-exact outputs can hide small position errors in a tiny random model; the
    log-probabilities of the select branch's tokens cannot."""
    model, processor, records, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3)

    def select_request(i, candidates):
        return Request(prompts.render(processor, prompts.select_messages(records[i], candidates)), records[i].image,
                       key=f"{records[i].id}/select{len(candidates)}")

    _, candidates, selects = sampler._sample_and_select_branches(
        requests[:2], SamplingParams(k=2, temperature=1.0, max_new_tokens=6, seed=2), select_request=select_request,
        select_ks=[2], select_params=SamplingParams(k=1, temperature=0.0, max_new_tokens=5))
    for i, branch in enumerate(selects[2]):
        request = select_request(i, [c.text for c in candidates[i]])
        expected = _teacher_forced_logprobs(model, processor, request, branch.tokens)
        got = torch.tensor(branch.logprobs, dtype=torch.float64)
        assert torch.all((got - expected).abs() <= 1e-5 * expected.abs()), (got, expected)


@qwen_only
def test_sample_and_select_shapes_without_sampling_or_select(setup, kind):
    model, processor, records, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3)
    greedy, candidates, selects = sampler.sample_and_select(
        requests, SamplingParams(k=1, temperature=0.9, max_new_tokens=6), select_request=None, select_ks=[],
        select_params=GREEDY)
    assert candidates == [[g] for g in greedy] and selects == {}
    greedy3, candidates3, _ = sampler.sample_and_select(
        requests, SamplingParams(k=3, temperature=0.0, max_new_tokens=6), select_request=None, select_ks=[],
        select_params=GREEDY)
    assert greedy3 == greedy and candidates3 == [[g] * 3 for g in greedy]


@qwen_only
def test_select_prompt_without_the_shared_prefix_falls_back_to_a_fresh_decode(setup, tmp_path, kind):
    model, processor, records, requests = setup
    sampler = _sampler(kind, model, processor, batch_size=3)
    other_image = tmp_path / "other.png"
    load_images([requests[1]])[0].save(other_image)

    def select_request(i, candidates):   # question 0's select prompt shows another image file
        image = str(other_image) if i == 0 else records[i].image
        return Request(prompts.render(processor, prompts.select_messages(records[i], candidates)), image)

    select_params = SamplingParams(k=1, temperature=0.0, max_new_tokens=6)
    _, candidates, selects = sampler.sample_and_select(
        requests, SamplingParams(k=2, temperature=1.0, max_new_tokens=6, seed=1), select_request=select_request,
        select_ks=[2], select_params=select_params)
    hf = HFSampler(model, processor, batch_size=1, show_progress=False)
    expected = hf.sample([select_request(i, candidates[i]) for i in range(3)], select_params)
    assert selects[2] == [t[0] for t in expected]


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_branch_budgets_give_exact_lengths_and_prefixes_of_the_same_draws(setup, kind):
    """``_branch_limit`` (how benchmarks force lengths) cuts each branch at its own budget; the
    tokens are the start of the same branch without a budget (draws do not depend on it)."""
    model, processor, _, requests = setup

    class Budgeted(SAMPLERS[kind]):
        def _branch_limit(self, index, branch, max_new_tokens):
            return 2 + 3 * index + branch

    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=20, seed=4)
    budgeted = Budgeted(model, processor, batch_size=2, show_progress=False, backend="torch", sync_every=3)
    free = _sampler(kind, model, processor, batch_size=2, sync_every=3)
    budgeted.stop_ids = free.stop_ids = []
    short, full = budgeted._sample_branches(requests, params), free._sample_branches(requests, params)
    assert [[len(b.tokens) for b in bs] for bs in short] == [[2 + 3 * i + b for b in range(3)] for i in range(3)]
    for short_bs, full_bs in zip(short, full):
        for a, b in zip(short_bs, full_bs):
            assert a.tokens == b.tokens[:len(a.tokens)]


# ---------------------------------------------------------------------------- continuous batching
RAGGED = SamplingParams(k=3, temperature=1.0, max_new_tokens=14, seed=3)


def _six(requests):
    """The three requests under two keys each: six questions, ragged lengths."""
    return requests + [Request(r.prompt, r.image, key=r.key + "b") for r in requests]


def _ragged_run(sampler, requests, params=RAGGED):
    sampler.stop_ids = list(range(100, 140))          # about 8% stop chance per token: ragged ends
    return sampler._sample_branches(requests, params), dict(sampler.last_stats)


def _same_branches(got, expected):
    for got_bs, expected_bs in zip(got, expected):
        assert [b.tokens for b in got_bs] == [b.tokens for b in expected_bs]
        for a, b in zip(got_bs, expected_bs):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)


def _occupancy(stats) -> float:
    return stats["decode_tokens"] / (stats["decode_steps"] * stats["slots"])


def test_questions_join_as_slots_free_with_the_same_samples(setup):
    """Three slots for six questions of three branches: questions are admitted one after another
    while others decode; the samples equal an all-at-once run and the grouped sampler's, and
    the slots are busier than the grouped sampler's three rows."""
    model, processor, _, requests = setup
    requests = _six(requests)
    wide, _ = _ragged_run(_sampler("continuous", model, processor, batch_size=6), requests)
    narrow, stats = _ragged_run(_sampler("continuous", model, processor, max_slots=3, sync_every=2), requests)
    grouped, grouped_stats = _ragged_run(_sampler("grouped", model, processor, batch_size=1, sync_every=2), requests)
    _same_branches(narrow, wide)
    _same_branches(grouped, wide)
    lengths = [len(b.tokens) for bs in narrow for b in bs]
    assert len(set(lengths)) > 3                                      # ragged indeed
    assert stats["slots"] == 3 and stats["prefill_forwards"] == 6    # one admission per question
    assert stats["generated_tokens"] == sum(lengths) and stats["decode_tokens"] == sum(lengths) - 18
    assert _occupancy(stats) > _occupancy(grouped_stats)
    assert stats["steady_decode_steps"] > 0 and _occupancy(stats) < stats["steady_occupancy"] <= 1


def test_a_short_kv_pool_preempts_and_gives_the_same_samples(setup):
    model, processor, _, requests = setup
    requests = _six(requests)
    roomy, _ = _ragged_run(_sampler("continuous", model, processor, max_slots=6, kv_block_size=4, sync_every=2),
                           requests)
    short, stats = _ragged_run(_sampler("continuous", model, processor, max_slots=6, kv_block_size=4,
                                        kv_budget_tokens=180, sync_every=2), requests)
    assert stats["preemptions"] > 0
    _same_branches(short, roomy)
    assert stats["peak_kv_bytes"] <= stats["kv_pool_bytes"]


def test_kv_pool_too_small_for_one_question_is_a_clear_error(setup):
    model, processor, _, requests = setup
    sampler = _sampler("continuous", model, processor, kv_block_size=4, kv_budget_tokens=16)
    with pytest.raises(RuntimeError, match="raise kv_budget_tokens"):
        sampler.sample(requests, RAGGED)


def test_kv_blocks_follow_the_tokens_held(setup):
    """Three slots, three branches of exactly 10 tokens: one question at a time holds the pool,
    its blocks are freed when it ends, and every decode step has all slots busy."""
    model, processor, _, requests = setup
    text = model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4     # fp32 K and V
    lengths = [len(_inputs(processor, r)["input_ids"][0]) for r in requests]
    sampler = _sampler("continuous", model, processor, max_slots=3, kv_block_size=4, sync_every=2)
    sampler.stop_ids = []
    sampler.sample(requests, SamplingParams(k=3, temperature=1.0, max_new_tokens=10, seed=0))
    stats = sampler.last_stats
    blocks = lambda n: -(-n // 4)  # noqa: E731
    # At most one prompt + three branches of 9 cached tokens + one interval ahead (2), in blocks.
    assert stats["peak_kv_bytes"] <= 4 * per_token * (blocks(max(lengths)) + 3 * blocks(9 + 2))
    assert stats["peak_kv_bytes"] >= per_token * (max(lengths) + 3 * 9)
    assert stats["decode_steps"] == 3 * 9 and _occupancy(stats) == 1.0


def test_select_branches_with_fewer_slots_than_branches(setup):
    """Two slots for a question's four branches (greedy + three candidates) and its selects."""
    model, processor, records, requests = setup

    def select_request(i, candidates):
        return Request(prompts.render(processor, prompts.select_messages(records[i], candidates)), records[i].image,
                       key=f"{records[i].id}/select{len(candidates)}")

    sampler = _sampler("continuous", model, processor, max_slots=2, sync_every=2)
    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=8, seed=4)
    select_params = SamplingParams(k=1, temperature=0.0, max_new_tokens=6)
    greedy, candidates, selects = evaluation.sample_and_select(sampler, requests, params, select_request, [2, 3],
                                                               select_params)
    hf = HFSampler(model, processor, batch_size=3, show_progress=False)
    assert greedy == [t[0] for t in hf.sample(requests, SamplingParams(k=1, temperature=0.0, max_new_tokens=8))]
    assert candidates == hf.sample(requests, params)
    for k in (2, 3):
        expected = hf.sample([select_request(i, candidates[i][:k]) for i in range(3)], select_params)
        assert selects[k] == [t[0] for t in expected]


@qwen_only
def test_missing_image_is_a_clear_error(setup, tmp_path, kind):
    model, processor, _, requests = setup
    with pytest.raises(DataError, match="nope.png"):
        _sampler(kind, model, processor).sample([Request(requests[0].prompt, str(tmp_path / "nope.png"))], GREEDY)


@qwen_only
@pytest.mark.skipif(not TRITON_INTERPRETED, reason="needs TRITON_INTERPRET=1 (CPU run of the Triton kernel)")
def test_triton_cascade_backend_gives_the_same_branches(setup, kind):
    model, processor, _, requests = setup
    params = SamplingParams(k=2, temperature=1.0, max_new_tokens=5, seed=3)
    by_backend = {}
    for backend in ("torch", "triton"):
        sampler = SAMPLERS[kind](model, processor, batch_size=3, show_progress=False, backend=backend,
                                 cuda_graphs=False)
        by_backend[backend] = sampler._sample_branches(requests[:2], params)
    for torch_branches, triton_branches in zip(by_backend["torch"], by_backend["triton"]):
        for a, b in zip(torch_branches, triton_branches):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-5)


@qwen_only
def test_cpp_paged_attention_gives_the_same_branches(setup):
    """The continuous sampler's CPU path ("auto": the C++ paged kernel when built) against the
    torch path."""
    from r3v_fast.ops import cpp_backend

    if not cpp_backend.available():
        pytest.skip("needs the C++ extension")
    model, processor, _, requests = setup
    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=8, seed=3)
    by_backend = {backend: SharedPrefixSampler(model, processor, batch_size=2, show_progress=False,
                                               backend=backend)._sample_branches(requests, params)
                  for backend in ("torch", "cpp")}
    _same_branches(by_backend["cpp"], by_backend["torch"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_equals_eager_and_generate(tiny_qwen2vl_dir, rgb_images, tmp_path, kind):
    """On CUDA (fp32): greedy equals HF generate; sampled branches with early stops and layout
    changes (grouped: compaction and re-capture; continuous: slot moves, admissions and bucket
    changes) are identical with and without CUDA graphs."""
    model, processor = load_vlm(tiny_qwen2vl_dir, device="cuda")
    requests = []
    for i, (image, question) in enumerate(zip(rgb_images, QUESTIONS)):
        image.save(tmp_path / f"{i}.png")
        record = Record(id=str(i), image=str(tmp_path / f"{i}.png"), question=question, answer="1",
                        dataset="shapes-math")
        requests.append(Request(prompts.render(processor, prompts.cot_messages(record)), record.image))
    graphs = SAMPLERS[kind](model, processor, batch_size=3, show_progress=False, sync_every=2, cuda_graphs=True)
    eager = SAMPLERS[kind](model, processor, batch_size=3, show_progress=False, sync_every=2, cuda_graphs=False)
    for (branch,), request in zip(graphs._sample_branches(requests, GREEDY), requests):
        inputs = _inputs(processor, request).to("cuda")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=12, eos_token_id=graphs.stop_ids,
                                 pad_token_id=pad_id(processor))
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in graphs.stop_ids), len(new))
        assert branch.tokens == new[:end]
    for sampler in (graphs, eager):
        sampler.stop_ids = list(range(100, 140))
    params = SamplingParams(k=4, temperature=1.0, max_new_tokens=20, seed=9)
    with_graphs, without = graphs._sample_branches(requests, params), eager._sample_branches(requests, params)
    assert graphs.cuda_graphs is True               # capture did not fall back
    for a_branches, b_branches in zip(with_graphs, without):
        assert [a.tokens for a in a_branches] == [b.tokens for b in b_branches]
