"""HF sampler and the batch-independent draw: K completions per prompt, greedy equals plain
generate, seeds reproduce, and a request's samples do not depend on its batch.

The draw's references share no code with it: splitmix64 in Python integers (mod 2^64), the
exponential race's distribution against the probabilities it is given, and transformers' own
warpers for the sampling distribution.
"""

import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from r3v_fast.data import prompts
from r3v_fast.data.records import DataError, Record
from r3v_fast.engine.sampler import (GREEDY, HFSampler, RaceDrawProcessor, Request, SamplingParams,
                                     branch_key, mix64, race_draw, race_noise, sample_tokens)
from r3v_fast.model.loading import load_vlm

MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """The published splitmix64 finalizer on unsigned Python integers."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_mix64_is_splitmix64_on_all_64_bits():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-(1 << 63), (1 << 63) - 1, (500,), generator=gen, dtype=torch.long)
    x[:4] = torch.tensor([0, -1, (1 << 63) - 1, -(1 << 63)])
    got = [v & MASK64 for v in mix64(x).tolist()]
    assert got == [_splitmix64(v & MASK64) for v in x.tolist()]


def test_race_draw_follows_the_probabilities():
    """20000 rows with distinct keys draw from p = (0.5, 0.3, 0.15, 0.05, 0), given unnormalized:
    every frequency within 4 standard deviations, the zero-probability token never."""
    rows = 20000
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).repeat(rows, 1) * 7.0
    tokens = torch.tensor([11, 3, 900, 4, 5]).repeat(rows, 1)
    keys = torch.tensor([branch_key(1, f"q{i}", 0) for i in range(rows)])
    drawn = race_draw(probs, tokens, keys, torch.full((rows,), 3))
    counts = torch.bincount(drawn, minlength=5).double()
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    sigma = (rows * p * (1 - p)).sqrt()
    assert counts[4] == 0
    assert torch.all((counts[:4] - rows * p[:4]).abs() <= 4 * sigma[:4]), counts


def test_race_noise_depends_only_on_key_step_and_token():
    keys = torch.tensor([branch_key(0, "a", 0), branch_key(0, "a", 1), branch_key(1, "a", 0)])
    tokens = torch.arange(6).repeat(3, 1)
    noise = race_noise(keys, torch.tensor([2, 2, 2]), tokens)                    # [3, 6]
    alone = race_noise(keys[1:2], torch.tensor([2]), tokens[:1, [4, 0]])          # row 1 alone, two tokens
    assert torch.equal(alone, noise[1:2, [4, 0]])
    assert len({round(v, 12) for v in noise.flatten().tolist()}) == 18            # branch, seed, token all matter
    assert not torch.equal(race_noise(keys, torch.tensor([3, 3, 3]), tokens), noise)  # and the step
    assert branch_key(0, "a", 0) == branch_key(0, "a", 0) != branch_key(0, "b", 0)
    big = race_noise(torch.tensor([branch_key(5, "x", 0)]), torch.tensor([0]), torch.arange(20000)[None])
    assert abs(big.mean().item() - 1.0) < 0.03 and big.min() > 0               # Exp(1): mean 1


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.9, 50, 0.95), (1.3, 0, 0.8), (0.5, 3, 1.0), (2.0, 0, 1.0)])
def test_sample_tokens_equals_transformers_warpers_then_the_draw(temperature, top_k, top_p):
    """Same token as transformers' Temperature, TopK and TopP warpers followed by the race
    processor, and the tokens it can draw are exactly the ones the warpers keep."""
    gen = torch.Generator().manual_seed(1)
    rows, vocab, step = 64, 300, 7
    logits = torch.randn(rows, vocab, generator=gen) * 3
    keys = torch.tensor([branch_key(2, f"r{i}", i % 3) for i in range(rows)])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    token, logprob = sample_tokens(logits, torch.full((rows,), temperature), params, keys, torch.full((rows,), step))
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    input_ids = torch.zeros(rows, 10 + step, dtype=torch.long)
    scores = logits.clone()
    for warper in warpers:
        scores = warper(input_ids, scores)
    chosen = RaceDrawProcessor(keys.tolist(), prompt_width=10)(input_ids, scores.clone())
    assert torch.equal(chosen.argmax(-1), token)
    assert torch.isfinite(chosen).sum() == rows                                  # one token left per row
    assert torch.isfinite(scores[torch.arange(rows), token]).all()               # drawn from the kept set
    torch.testing.assert_close(logprob, torch.log_softmax(logits, -1)[torch.arange(rows), token])
    # Greedy rows take the argmax of the raw logits.
    greedy, _ = sample_tokens(logits, torch.zeros(rows), params, keys, torch.zeros(rows, dtype=torch.long))
    assert torch.equal(greedy, logits.argmax(-1))


@pytest.fixture(scope="module", params=["qwen2vl", "llava"])
def setup(request, rgb_images, tmp_path_factory):
    model, processor = load_vlm(request.getfixturevalue(f"tiny_{request.param}_dir"))
    model.eval()
    folder = tmp_path_factory.mktemp("imgs")
    requests = []
    for i, (img, q) in enumerate(zip(rgb_images[:2], ["How many red objects?", "Remove all circles. How many objects are left?"])):
        path = folder / f"{i}.png"
        img.save(path)
        record = Record(id=str(i), image=str(path), question=q, answer="1", dataset="shapes-math")
        requests.append(Request(prompts.render(processor, prompts.cot_messages(record)), str(path), key=record.id))
    return model, processor, requests


def test_k_samples_per_prompt_and_seed_reproduces(setup):
    model, processor, requests = setup
    sampler = HFSampler(model, processor, batch_size=2, show_progress=False)
    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=6, seed=1)
    first = sampler.sample(requests, params)
    again = sampler.sample(requests, params)
    assert len(first) == 2 and all(len(texts) == 3 for texts in first)
    assert first == again


def test_greedy_matches_plain_generate_one_by_one(setup):
    model, processor, requests = setup
    sampler = HFSampler(model, processor, batch_size=2, show_progress=False)
    batched = sampler.sample(requests, SamplingParams(k=1, temperature=0.0, max_new_tokens=8))
    for req, texts in zip(requests, batched):
        from PIL import Image

        inputs = processor(text=[req.prompt], images=[Image.open(req.image).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=8,
                                 eos_token_id=sampler.stop_ids, pad_token_id=processor.tokenizer.pad_token_id)
        expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        assert texts == [expected]
    # K > 1 at temperature 0 repeats the greedy output
    assert sampler.sample(requests, SamplingParams(k=3, temperature=0.0, max_new_tokens=8)) == \
        [t * 3 for t in batched]
    assert GREEDY.greedy


def test_a_requests_samples_do_not_depend_on_its_batch(setup, rgb_images, tmp_path):
    """Alone, in a batch, in another order, with another batch size: the same K samples."""
    model, processor, requests = setup
    path = tmp_path / "third.png"
    rgb_images[2].save(path)
    record = Record(id="2", image=str(path), question="How many?", answer="1", dataset="shapes-math")
    third = Request(prompts.render(processor, prompts.cot_messages(record)), str(path), key="2")
    requests = [Request(r.prompt, r.image, key=str(i)) for i, r in enumerate(requests)] + [third]
    params = SamplingParams(k=3, temperature=1.0, max_new_tokens=8, seed=3)
    together = HFSampler(model, processor, batch_size=3, show_progress=False).sample(requests, params)
    pairs = HFSampler(model, processor, batch_size=2, show_progress=False).sample(requests[::-1], params)[::-1]
    alone = [HFSampler(model, processor, batch_size=1, show_progress=False).sample([r], params)[0] for r in requests]
    assert together == pairs == alone
    assert len({t for texts in together for t in texts}) > 3                     # real draws, not one text
    # The key names the draws: another key, other samples.
    renamed = HFSampler(model, processor, batch_size=1, show_progress=False).sample(
        [Request(requests[0].prompt, requests[0].image, key="other")], params)[0]
    assert renamed != alone[0]


def test_missing_image_is_a_clear_error(setup, tmp_path):
    model, processor, requests = setup
    sampler = HFSampler(model, processor, show_progress=False)
    with pytest.raises(DataError, match="nope.png"):
        sampler.sample([Request(requests[0].prompt, str(tmp_path / "nope.png"))], GREEDY)
