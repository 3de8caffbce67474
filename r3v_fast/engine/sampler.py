"""The sampler seam: K solutions per prompt, batched over prompts.

Everything that generates text (bootstrapping, Pass@1, maj@K, test-time selection) goes
through ``Sampler.sample``. Two implementations plug in behind it:

- ``HFSampler`` (``--sampler hf``): transformers' ``generate`` with ``num_return_sequences=K``,
  i.e. K full copies of every prompt's KV cache. The plain baseline.
- ``SharedPrefixSampler`` (``--sampler shared``, the default; r3v_fast.engine.shared_sampler)
  prefills each image + question once and decodes the K branches against one copy of that
  prefix's KV cache.

Sampling follows the public R³V setting by default: K = 3, temperature 0.9, top-p 0.95,
top-k 50, up to 384 new tokens. Temperature 0 means greedy (Pass@1 uses K = 1, greedy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from r3v_fast.config import SamplingOptions
from r3v_fast.data.records import load_image
from r3v_fast.model.loading import pad_id, stop_token_ids


_OPTIONS = SamplingOptions()   # the defaults of every sampling setting (r3v_fast.config)


@dataclass(frozen=True)
class SamplingParams:
    """What one ``sample`` call draws: K completions per request at these settings."""

    k: int = _OPTIONS.k
    temperature: float = _OPTIONS.temperature
    top_p: float = _OPTIONS.top_p
    top_k: int = _OPTIONS.top_k
    max_new_tokens: int = _OPTIONS.max_new_tokens
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @classmethod
    def from_options(cls, options: SamplingOptions, *, seed: int, **overrides) -> "SamplingParams":
        """The run's sampling settings, with per-call ``overrides`` (k, max_new_tokens, ...)."""
        values = dict(k=options.k, temperature=options.temperature, top_p=options.top_p,
                      top_k=options.top_k, max_new_tokens=options.max_new_tokens, seed=seed)
        return cls(**{**values, **overrides})


GREEDY = SamplingParams(k=1, temperature=0.0)


@dataclass(frozen=True)
class Request:
    """One prompt to complete: a rendered chat prompt, the image it refers to, and a key.

    ``key`` names the request for the random draws (the question id in the R³V loop): a
    request's samples are to depend only on (params.seed, key, branch index), never on which
    other requests share its batch or rank.
    """

    prompt: str
    image: str
    key: str = ""


class Sampler(Protocol):
    def sample(self, requests: Sequence[Request], params: SamplingParams, *,
               desc: str | None = None) -> list[list[str]]:
        """Return, for each request, ``params.k`` completions (text only, special tokens removed)."""
        ...


def load_images(requests: Sequence[Request]) -> list[Image.Image]:
    """The requests' images as RGB; DataError naming the request's key and the file."""
    return [load_image(r.image, who=f"question {r.key!r}" if r.key else None) for r in requests]


class HFSampler:
    """Baseline sampler: ``model.generate`` on padded batches, K return sequences per prompt."""

    def __init__(self, model, processor, *, batch_size: int = 8, show_progress: bool = True):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.stop_ids = stop_token_ids(model, processor)

    @torch.no_grad()
    def sample(self, requests: Sequence[Request], params: SamplingParams, *,
               desc: str | None = None) -> list[list[str]]:
        if params.greedy and params.k != 1:
            # Identical greedy copies: decode once and repeat.
            once = self.sample(requests, SamplingParams(**{**params.__dict__, "k": 1}), desc=desc)
            return [texts * params.k for texts in once]
        device = next(self.model.parameters()).device
        outputs: list[list[str]] = []
        starts = range(0, len(requests), self.batch_size)
        bar = tqdm(starts, desc=desc or "sampling", unit="batch", disable=not self.show_progress, leave=False)
        for batch_no, start in enumerate(bar):
            batch = list(requests[start:start + self.batch_size])
            inputs = self.processor(text=[r.prompt for r in batch], images=load_images(batch),
                                    return_tensors="pt", padding=True).to(device)
            generation = dict(max_new_tokens=params.max_new_tokens, eos_token_id=self.stop_ids,
                              pad_token_id=pad_id(self.processor), num_return_sequences=params.k)
            if params.greedy:
                generation.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                generation.update(do_sample=True, temperature=params.temperature,
                                  top_p=params.top_p, top_k=params.top_k)
                # One seed per batch: reproducible for a fixed seed and batch composition.
                torch.manual_seed(params.seed * 1_000_003 + batch_no)
            tokens = self.model.generate(**inputs, **generation)       # [B*K, L_prompt + L_new]
            new_tokens = tokens[:, inputs["input_ids"].shape[1]:]      # [B*K, L_new] (left padding)
            texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            outputs.extend(texts[i * params.k:(i + 1) * params.k] for i in range(len(batch)))
        return outputs
