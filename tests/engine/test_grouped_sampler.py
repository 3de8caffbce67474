"""Grouped shared-prefix sampler: what only its scheduler does (groups, token budget, KV held).

Its sampling contract (greedy = generate, log-probs = teacher forcing, draws = HFSampler's,
select branches) is tested with the continuous sampler's in tests/engine/test_shared_sampler.py.
"""

import pytest
import torch

from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.grouped_sampler import GroupedPrefixSampler
from r3v_fast.engine.sampler import Request, SamplingParams, load_images
from r3v_fast.model.loading import load_vlm

QUESTIONS = ["How many red objects are there?",
             "Remove all circles. How many objects are left? Count the squares first.",
             "How many?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["qwen2vl", "llava"])
def setup(request, rgb_images, tmp_path_factory):
    model, processor = load_vlm(request.getfixturevalue(f"tiny_{request.param}_dir"))
    folder = tmp_path_factory.mktemp(f"grouped_{request.param}")
    requests = []
    for i, (image, question) in enumerate(zip(rgb_images, QUESTIONS)):
        path = folder / f"{i}.png"
        image.save(path)
        record = Record(id=str(i), image=str(path), question=question, answer="1", dataset="shapes-math")
        requests.append(Request(prompts.render(processor, prompts.cot_messages(record)), str(path), key=record.id))
    return model, processor, requests


def _sampler(model, processor, **kwargs):
    return GroupedPrefixSampler(model, processor, show_progress=False, backend="torch", **kwargs)


def _prompt_length(processor, request) -> int:
    return processor(text=[request.prompt], images=load_images([request]), return_tensors="pt")["input_ids"].shape[1]


def test_token_budget_splits_groups_and_kv_is_prefix_plus_branches(setup):
    model, processor, requests = setup
    text = model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4     # fp32 K and V
    lengths = [_prompt_length(processor, r) for r in requests]
    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=10, seed=0)
    sampler = _sampler(model, processor, batch_size=8)
    sampler.stop_ids = []                                   # forced length: every branch gets 10 tokens
    sampler.sample(requests, params)
    assert sampler.last_stats["groups"] == 1
    # One padded prefix per question + 3 branches x 10 tokens, never 3 copies of the prompt.
    assert sampler.last_stats["peak_kv_bytes"] == per_token * 3 * (max(lengths) + 3 * 10)
    # Every branch decodes to the end of the group: 9 decode steps, 27 decoded tokens per question.
    assert sampler.last_stats["decode_steps"] == 9 and sampler.last_stats["decode_tokens"] == 3 * 3 * 9
    budget = lengths[0] + lengths[1] + 2 * 3 * 10           # the first two questions fit, the third does not
    split = _sampler(model, processor, batch_size=8, max_batch_tokens=budget)
    split.stop_ids = []
    split.sample(requests, params)
    assert split.last_stats["groups"] == 2


def test_batch_size_makes_groups(setup):
    model, processor, requests = setup
    sampler = _sampler(model, processor, batch_size=2)
    sampler.sample(requests, SamplingParams(k=2, temperature=1.0, max_new_tokens=4, seed=1))
    assert sampler.last_stats["groups"] == 2 and sampler.last_stats["slots"] == 4
