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

Random draws are batch-independent (the sampler seam of docs/architecture.md, "The three
seams"): a request's samples depend only on (params.seed, request.key, branch index), never on
which other requests share its batch, group, rank or admission order. Both samplers draw the
same way, defined once here:

- the distribution is transformers' own: logits / temperature, then top-k, then top-p
  (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``);
- the draw is the exponential race: the token is argmax_v p_v / E_v with E_v ~ Exp(1)
  independent, an exact draw from p (P(argmax = v) = p_v / sum p) that needs no cumulative
  search;
- E_v comes from a counter-based generator, not a stateful one: a splitmix64 integer hash of
  (row key, decode step, token id), where the row key is a 64-bit digest of (seed, request
  key, branch index) and the step is the number of tokens the branch generated before. So the
  noise a branch sees at its t-th token is fixed in advance, whatever else runs beside it.

``HFSampler`` applies the draw through a final logits processor after transformers' warpers
(``RaceDrawProcessor``: every token but the drawn one is set to -inf, so ``generate`` can only
pick that one); the shared-prefix samplers call ``sample_tokens`` on their logits.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

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


# ----------------------------------------------------------------------------- random draws
def _signed64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 math)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed64(0x9E3779B97F4A7C15)     # splitmix64 increment
_MIX1 = _signed64(0xBF58476D1CE4E5B9)       # splitmix64 multipliers (Steele, Lea, Flood 2014)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: mask the sign copies off)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 of int64 tensors, elementwise: a bijective 64-bit hash whose outputs pass
    BigCrush as a counter-based stream. int64 add and multiply wrap modulo 2^64 (two's
    complement) on every torch device, which is the unsigned arithmetic the hash needs."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def request_key(request: "Request") -> str:
    """The name a request's draws are keyed by: its key, or its prompt and image if it has none."""
    return request.key or f"{request.image}\n{request.prompt}"


def branch_key(seed: int, key: str, branch: int) -> int:
    """64-bit row key of one branch (as a signed int64): a digest of (seed, key, branch)."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{branch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def race_noise(row_keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """E ~ Exp(1) for each (row, token): row_keys [R] int64, steps [R] int64 (tokens the row
    generated before this draw), token_ids [R, C] int64 -> [R, C] float64.

    Counter (step, token) -> splitmix64, xor the row key -> splitmix64 -> the top 53 bits as a
    uniform u in (0, 1) (the +0.5 keeps u off 0) -> E = -log u. float64: a float32 u would have
    only 24 bits, so E would be coarse in its tail, where the race is decided for rare tokens."""
    counter = (steps[:, None] << 32) + token_ids                                # [R, C], token < 2^32
    bits = mix64(mix64(counter) ^ row_keys[:, None])                             # [R, C] int64
    uniform = (_shift_right(bits, 11).to(torch.float64) + 0.5) * 2.0 ** -53     # [R, C] in (0, 1)
    return -torch.log(uniform)


def race_draw(probs: torch.Tensor, token_ids: torch.Tensor, row_keys: torch.Tensor,
              steps: torch.Tensor) -> torch.Tensor:
    """Column of each row's draw from probs [R, C] (unnormalized is fine; 0 = never) over the
    tokens token_ids [R, C]: argmax p / E. -> [R] int64 column indices."""
    noise = race_noise(row_keys, steps, token_ids)                               # [R, C] float64
    return (probs.to(torch.float64) / noise).argmax(dim=-1)


def sample_tokens(logits: torch.Tensor, temps: torch.Tensor, params: SamplingParams,
                  row_keys: torch.Tensor, steps: torch.Tensor, *, any_sampled: bool | None = None):
    """Next token of each row and its log-probability under the raw logits.

    logits [R, V] float32; temps [R] (0 = greedy: argmax of the raw logits, as ``generate``);
    row_keys [R] int64 (``branch_key``); steps [R] int64. Sampled rows: logits / T, keep the
    top_k (0 = all), then top-p as transformers' ``TopPLogitsWarper`` computes it (ascending
    sort, cumulative probability; a token goes if the mass at or below it is <= 1 - top_p, so
    the most likely token always stays), then the exponential race with ``race_noise``.
    ``any_sampled``: whether some temperature is > 0, if the caller knows it (else it is read
    from ``temps``, a host sync). Returns (token [R] int64, logprob [R] float32).
    """
    token = logits.argmax(dim=-1)                                                # greedy
    sampled = temps > 0
    if bool(sampled.any()) if any_sampled is None else any_sampled:
        vocab = logits.shape[-1]
        keep = vocab if params.top_k <= 0 else min(params.top_k, vocab)
        scale = torch.where(sampled, temps, 1.0)[:, None]
        values, indices = torch.topk(logits / scale, keep, dim=-1)              # [R, k] descending
        probs = torch.softmax(values, dim=-1)                                    # [R, k]
        if params.top_p < 1.0:
            # transformers' order of summation: ascending, so the cut falls where theirs does.
            at_or_below = torch.cumsum(probs.flip(-1), dim=-1).flip(-1)          # mass of tokens <= this one
            cut = at_or_below <= 1.0 - params.top_p
            cut[:, 0] = False                                                    # min_tokens_to_keep = 1
            probs = probs.masked_fill(cut, 0.0)
        drawn = indices.gather(1, race_draw(probs, indices, row_keys, steps)[:, None]).squeeze(1)
        token = torch.where(sampled, drawn, token)
    # log p(token) = logit - logsumexp(logits): the log-softmax at one entry, without a second
    # [R, V] tensor.
    return token, logits.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


class RaceDrawProcessor(LogitsProcessor):
    """The last logits processor of ``HFSampler``: draws each row's token from the warped scores
    by the exponential race and leaves only that token finite (0, the rest -inf).

    rows: the row keys of the ``generate`` batch [B * K] (``branch_key``, request-major, as
    ``num_return_sequences`` repeats each prompt); prompt_width: the padded prompt length, so
    that a row's step is the number of tokens generated so far. Noise is computed only for the
    tokens the warpers kept (probability > 0)."""

    def __init__(self, row_keys: Sequence[int], prompt_width: int):
        self.row_keys = torch.tensor(list(row_keys), dtype=torch.long)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        device = scores.device
        num_rows = scores.shape[0]
        probs = torch.softmax(scores.float(), dim=-1)                            # [R, V]; 0 where -inf
        rows, cols = torch.nonzero(probs > 0, as_tuple=True)                     # the kept tokens
        keys = self.row_keys.to(device)[rows]
        steps = torch.full_like(rows, input_ids.shape[1] - self.prompt_width)
        ratio = torch.zeros(probs.shape, dtype=torch.float64, device=device)
        ratio[rows, cols] = probs[rows, cols].double() / race_noise(keys, steps, cols[:, None])[:, 0]
        chosen = ratio.argmax(dim=-1)                                            # [R]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(num_rows, device=device), chosen] = 0.0
        return out


class Sampler(Protocol):
    def sample(self, requests: Sequence[Request], params: SamplingParams, *,
               desc: str | None = None) -> list[list[str]]:
        """Return, for each request, ``params.k`` completions (text only, special tokens removed)."""
        ...


def load_images(requests: Sequence[Request]) -> list[Image.Image]:
    """The requests' images as RGB; DataError naming the request's key and the file."""
    return [load_image(r.image, who=f"question {r.key!r}" if r.key else None) for r in requests]


class HFSampler:
    """Baseline sampler: ``model.generate`` on padded batches, K return sequences per prompt.

    Sampled draws go through transformers' own warpers and then ``RaceDrawProcessor``, so a
    request's samples do not depend on its batch. ``last_stats`` after a call: generated
    tokens, decode steps (the longest new sequence of each batch: ``generate`` steps every row
    until the last one ends), slots (rows of a full batch), peak KV bytes (the largest cache a
    batch's ``generate`` returned) and the seconds until the last token.
    """

    def __init__(self, model, processor, *, batch_size: int = 8, show_progress: bool = True):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.stop_ids = stop_token_ids(model, processor)
        self.last_stats: dict = {}

    def _processors(self, batch: Sequence[Request], params: SamplingParams,
                    prompt_width: int) -> LogitsProcessorList:
        """transformers' warpers in ``generate``'s order, then the batch-independent draw (none
        for greedy decoding: argmax)."""
        if params.greedy:
            return LogitsProcessorList()
        row_keys = [branch_key(params.seed, request_key(r), b) for r in batch for b in range(params.k)]
        processors = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p))
        return LogitsProcessorList([*processors, RaceDrawProcessor(row_keys, prompt_width)])

    @torch.no_grad()
    def sample(self, requests: Sequence[Request], params: SamplingParams, *,
               desc: str | None = None) -> list[list[str]]:
        if params.greedy and params.k != 1:
            # Identical greedy copies: decode once and repeat.
            once = self.sample(requests, SamplingParams(**{**params.__dict__, "k": 1}), desc=desc)
            return [texts * params.k for texts in once]
        start_time = time.perf_counter()
        device = next(self.model.parameters()).device
        stats = {"generated_tokens": 0, "decode_steps": 0, "slots": self.batch_size * params.k,
                 "peak_kv_bytes": 0, "last_token_s": 0.0}
        outputs: list[list[str]] = []
        starts = range(0, len(requests), self.batch_size)
        bar = tqdm(starts, desc=desc or "sampling", unit="batch", disable=not self.show_progress, leave=False)
        stops = set(self.stop_ids)
        for start in bar:
            batch = list(requests[start:start + self.batch_size])
            inputs = self.processor(text=[r.prompt for r in batch], images=load_images(batch),
                                    return_tensors="pt", padding=True).to(device)
            width = inputs["input_ids"].shape[1]
            generation = dict(max_new_tokens=params.max_new_tokens, eos_token_id=self.stop_ids,
                              pad_token_id=pad_id(self.processor), num_return_sequences=params.k,
                              return_dict_in_generate=True)
            if params.greedy:
                generation.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                                  logits_processor=self._processors(batch, params, width))
            else:
                # Neutral sampling settings, so that generate adds no warpers of its own: ours
                # (the same classes, same order) run inside the list, before the draw.
                generation.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  logits_processor=self._processors(batch, params, width))
            result = self.model.generate(**inputs, **generation)
            new_tokens = result.sequences[:, width:]                   # [B*K, L_new] (left padding)
            texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            outputs.extend(texts[i * params.k:(i + 1) * params.k] for i in range(len(batch)))
            stats["decode_steps"] += new_tokens.shape[1]
            for row in new_tokens.tolist():
                stats["generated_tokens"] += next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], _cache_bytes(result.past_key_values))
            stats["last_token_s"] = time.perf_counter() - start_time
        self.last_stats = stats
        return outputs


def _cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers cache holds (0 for none)."""
    if cache is None:
        return 0
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
