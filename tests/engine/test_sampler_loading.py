"""Bootstrap sampling and evaluation load images per batch, never all up front: for both
samplers (``sample``, the bootstrap path, and ``score_questions``, the evaluation path with
test-time selection), the images a sampler decodes between two model forwards never exceed one
batch, and each question's image is decoded once per pass."""

import pytest
import torch

from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.engine import sampler as sampler_module
from r3v_fast.engine.evaluation import score_questions
from r3v_fast.engine.sampler import HFSampler, Request, SamplingParams
from r3v_fast.engine.grouped_sampler import GroupedPrefixSampler
from r3v_fast.engine.shared_sampler import SharedPrefixSampler
from r3v_fast.model.loading import load_vlm

BATCH = 2
N_QUESTIONS = 5


@pytest.fixture(scope="module")
def setup(tiny_qwen2vl_dir, rgb_images, tmp_path_factory):
    model, processor = load_vlm(tiny_qwen2vl_dir)
    folder = tmp_path_factory.mktemp("loading_images")
    records = []
    for i in range(N_QUESTIONS):
        path = folder / f"{i}.png"
        rgb_images[i % len(rgb_images)].save(path)
        records.append(Record(id=f"q{i}", image=str(path), question="How many red objects are there?",
                              answer="1", dataset="shapes-math"))
    return model, processor, records


def traced(model, monkeypatch):
    """Events in order: ("load", path) for every image decoded, "forward" for every LM-head call."""
    events = []
    real = sampler_module.load_image
    monkeypatch.setattr(sampler_module, "load_image", lambda path, **kw: (events.append(("load", path)),
                                                                          real(path, **kw))[1])
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: events.append("forward"))
    return events, handle


def loads_between_forwards(events) -> list[int]:
    runs, current = [], 0
    for event in events:
        if event == "forward":
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("kind", ["hf", "shared", "shared-grouped"])
def test_images_are_loaded_per_batch(setup, kind, monkeypatch):
    model, processor, records = setup
    cls = {"hf": HFSampler, "shared": SharedPrefixSampler, "shared-grouped": GroupedPrefixSampler}[kind]
    sampler = cls(model, processor, batch_size=BATCH, show_progress=False)
    render = prompts.renderer(processor)
    events, handle = traced(model, monkeypatch)
    try:
        requests = [Request(render(prompts.cot_messages(r)), r.image, key=r.id) for r in records]
        sampler.sample(requests, SamplingParams(k=2, temperature=1.0, max_new_tokens=3, seed=0))
        runs = loads_between_forwards(events)
        assert sum(runs) == N_QUESTIONS and max(runs) <= BATCH, runs
        assert events[0] == ("load", records[0].image) and events[1:BATCH] == [("load", records[1].image)]

        events.clear()
        score_questions(records, sampler, render, ks=(1, 2),
                        params=SamplingParams(k=2, temperature=1.0, max_new_tokens=3, seed=0))
        runs = loads_between_forwards(events)
        assert max(runs) <= BATCH, runs
        loaded = [e[1] for e in events if e != "forward"]
        # shared: one prefill per question serves greedy, samples and selection; hf: three passes.
        passes = 3 if kind == "hf" else 1
        assert sorted(loaded) == sorted([r.image for r in records] * passes)
    finally:
        handle.remove()
        torch.set_grad_enabled(True)
