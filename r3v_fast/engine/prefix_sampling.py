"""What the two shared-prefix samplers have in common: the public API and the prompt plumbing.

Shared-prefix sampling (docs/architecture.md, "Where the time and memory go") prefills each
image + question once and decodes its K branches against one copy of that prefix's KV. Two
samplers do it, and differ only in how they schedule the work:

- ``SharedPrefixSampler`` (r3v_fast.engine.shared_sampler, ``--sampler shared``): continuous
  batching over a paged KV pool; a fixed number of decode slots stays busy as branches end.
- ``GroupedPrefixSampler`` (r3v_fast.engine.grouped_sampler): groups of questions prefilled
  together and decoded until every branch of the group ends.

This module holds what they share: ``sample`` / ``sample_and_select`` (the ``Sampler``
protocol plus test-time selection from the cached prefix), the branch numbering of the random
draws, per-request preparation (processor call, image loaded once), collation of right-padded
prompt batches, prompt positions (Qwen-VL M-RoPE through the model's own ``get_rope_index``,
1-D otherwise), the backbone forward through a cache, and the check that a select prompt
continues the CoT prompt's cached tokens.

Positions: a branch token continues its prefix. For Qwen2-VL / Qwen2.5-VL M-RoPE the next text
position after a prompt of P tokens is P + rope_delta (``get_rope_index`` gives the 3-D
positions of the prompt and the delta), and all three rope rows of a text token are equal; a
select branch's token at prompt index C + s sits at C + s + rope_delta. LLaVA uses plain 1-D
positions.

Random draws: ``r3v_fast.engine.sampler.sample_tokens`` keyed by (seed, request key, branch
number, step). Branch numbers count the sampled branches of a request (the greedy branch of
``sample_and_select`` is not counted), so the K candidates of ``sample_and_select`` are the K
samples of ``sample``; a select branch is branch 0 of its own select request.

Outputs are decoded exactly like HFSampler (``batch_decode(..., skip_special_tokens=True)`` of
the new tokens up to and including the stop token), so the samplers are interchangeable.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from r3v_fast.engine.sampler import Request, SamplingParams, load_images
from r3v_fast.model.loading import lm_head_and_backbone, pad_id, stop_token_ids, unwrap_peft

__all__ = ["BranchOutput", "PreparedPrompt", "PrefixSamplerBase", "branch_numbers"]

# Token-sequence inputs of a processor (right-padded when prompts are batched).
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# Multimodal keys that ``get_rope_index`` of the Qwen-VL models reads.
_ROPE_KEYS = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def cache_keyword(module) -> str:
    """The keyword a model's forward takes its KV cache under: ``cache`` from transformers 5.24
    on (``past_key_values`` still works there with a FutureWarning, until 5.40), else
    ``past_key_values`` (5.17 and earlier have no ``cache``)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@dataclass
class BranchOutput:
    """One decoded branch: new token ids (up to and including the stop token, if any), the
    log-probability of each under the model's raw distribution, and the decoded text."""

    tokens: list[int]
    logprobs: list[float]
    text: str


@dataclass
class PreparedPrompt:
    index: int                       # position in the caller's request list
    request: Request
    image: object                    # PIL image
    inputs: dict                     # processor output for this request alone (batch of 1, CPU)
    ids: list[int]                   # its input ids


def branch_numbers(temperatures) -> list[int]:
    """The random-draw branch number of each branch: sampled branches count 0, 1, ... in order;
    greedy ones (temperature 0) draw nothing and get -1."""
    numbers, count = [], 0
    for t in temperatures:
        numbers.append(count if t > 0 else -1)
        count += t > 0
    return numbers


class PrefixSamplerBase:
    """``sample``, ``sample_and_select`` and the prompt plumbing; subclasses implement
    ``_run_eval(requests, params, temperatures, *, desc, select)`` -> for each request
    (BranchOutput per temperature, {k: select BranchOutput})."""

    def __init__(self, model, processor, *, show_progress: bool = True, backend: str = "auto",
                 cuda_graphs: bool | None = None):
        self.model = model
        self.processor = processor
        self.show_progress = show_progress
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.stop_ids = stop_token_ids(model, processor)
        self.pad_id = pad_id(processor)
        self.lm_head, self.backbone = lm_head_and_backbone(model)
        self.cache_keyword = cache_keyword(unwrap_peft(model).model)  # the module the backbone calls
        base = unwrap_peft(model)
        self.config = base.config
        self.num_layers = self.config.get_text_config().num_hidden_layers
        # Qwen-VL models: 3-D M-RoPE from the model's own get_rope_index; others: 1-D positions.
        self.rope_index = getattr(base.model, "get_rope_index", None)
        self.image_token_id = next((getattr(self.config, name) for name in ("image_token_id", "image_token_index")
                                    if getattr(self.config, name, None) is not None), None)
        self.last_stats: dict = {}

    # ------------------------------------------------------------------------- public API
    @torch.no_grad()
    def sample(self, requests: Sequence[Request], params: SamplingParams, *,
               desc: str | None = None) -> list[list[str]]:
        """For each request, ``params.k`` completions (text only, special tokens removed)."""
        if params.greedy and params.k != 1:
            # Identical greedy copies: decode once and repeat (as HFSampler).
            once = self.sample(requests, SamplingParams(**{**params.__dict__, "k": 1}), desc=desc)
            return [texts * params.k for texts in once]
        temperatures = [max(params.temperature, 0.0)] * params.k
        outputs = self._run(requests, params, temperatures, desc=desc or "sampling")
        return [[branch.text for branch in branches] for branches, _ in outputs]

    @torch.no_grad()
    def sample_and_select(self, requests: Sequence[Request], params: SamplingParams, *,
                          select_request: Callable[[int, list[str]], Request], select_ks: Sequence[int],
                          select_params: SamplingParams,
                          ) -> tuple[list[str], list[list[str]], dict[int, list[str]]]:
        """Greedy answer, ``params.k`` sampled candidates and, for each k in ``select_ks``, the
        answer to ``select_request(i, candidates[:k])``, all from one prefill per request.

        Same contract as r3v_fast.engine.evaluation.sample_and_select: with params.k == 1 the
        candidates are the greedy answer; a greedy ``params`` gives K copies of it.
        """
        greedy, candidates, selects = self._sample_and_select_branches(
            requests, params, select_request=select_request, select_ks=select_ks, select_params=select_params)
        return ([g.text for g in greedy], [[c.text for c in cands] for cands in candidates],
                {k: [b.text for b in branches] for k, branches in selects.items()})

    @torch.no_grad()
    def _sample_and_select_branches(self, requests, params, *, select_request, select_ks, select_params):
        """``sample_and_select`` with BranchOutput (token ids, log-probs, text) everywhere."""
        temperatures = [0.0] + ([] if params.greedy or params.k == 1 else [params.temperature] * params.k)
        select = (select_request, list(select_ks), select_params, params.k) if select_ks else None
        outputs = self._run(requests, params, temperatures, desc="eval sample + select", select=select)
        greedy = [branches[0] for branches, _ in outputs]
        if len(temperatures) == 1:
            candidates = [[g] * params.k for g in greedy]
        else:
            candidates = [branches[1:] for branches, _ in outputs]
        selects = {k: [sel[k] for _, sel in outputs] for k in select_ks}
        return greedy, candidates, selects

    @torch.no_grad()
    def _sample_branches(self, requests: Sequence[Request], params: SamplingParams) -> list[list[BranchOutput]]:
        """Like ``sample`` but returns token ids and per-token log-probabilities as well."""
        temperatures = [max(params.temperature, 0.0)] * params.k
        return [branches for branches, _ in self._run(requests, params, temperatures, desc="sampling")]

    def _run(self, requests, params, temperatures, *, desc, select=None):
        """[(BranchOutput per temperature, {k: select BranchOutput}) per request], in eval mode."""
        if not requests:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            return self._run_eval(requests, params, temperatures, desc=desc, select=select)
        finally:
            self.model.train(was_training)

    def _run_eval(self, requests, params, temperatures, *, desc, select=None):
        raise NotImplementedError

    def _branch_limit(self, index: int, branch: int, max_new_tokens: int) -> int:
        """New-token budget of branch ``branch`` of request ``index``: ``max_new_tokens``.
        Benchmarks override it to give branches fixed lengths (with no stop tokens)."""
        return max_new_tokens

    # ------------------------------------------------------------------------- prompts
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def _use_graphs(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        return True if self.cuda_graphs is None else bool(self.cuda_graphs)

    def _prepare(self, index: int, request: Request, image=None) -> PreparedPrompt:
        image = load_images([request])[0] if image is None else image
        inputs = dict(self.processor(text=[request.prompt], images=[image], return_tensors="pt"))
        return PreparedPrompt(index, request, image, inputs, inputs["input_ids"][0].tolist())

    def _collate(self, prompts: Sequence[PreparedPrompt]) -> dict:
        """Batch per-request processor outputs: token sequences right-padded, everything else
        (pixel values, grids, image sizes) concatenated on dim 0, zero-padding other dims."""
        batch = {}
        longest = max(len(p.ids) for p in prompts)
        for key, first in prompts[0].inputs.items():
            if not isinstance(first, torch.Tensor):
                continue
            values = [p.inputs[key] for p in prompts]
            if key in _SEQUENCE_KEYS and first.dim() == 2:
                fill = self.pad_id if key == "input_ids" else 0
                batch[key] = torch.stack([torch.nn.functional.pad(v[0], (0, longest - v.shape[1]), value=fill)
                                          for v in values])
            else:
                shape = [max(v.shape[d] for v in values) for d in range(1, first.dim())]
                padded = []
                for v in values:
                    pad = []
                    for d in reversed(range(1, v.dim())):
                        pad += [0, shape[d - 1] - v.shape[d]]
                    padded.append(torch.nn.functional.pad(v, pad) if any(pad) else v)
                batch[key] = torch.cat(padded)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _prompt_positions(self, inputs: dict, lengths: torch.Tensor):
        """Positions of the right-padded prompts and each prompt's next text position.

        Returns (position_ids: [3, N, P] for M-RoPE models or [N, P], next_positions [N])."""
        input_ids = inputs["input_ids"]
        num_q, p_max = input_ids.shape
        valid = torch.arange(p_max, device=input_ids.device) < lengths[:, None]    # [N, P]
        if self.rope_index is None:
            return torch.arange(p_max, device=input_ids.device).expand(num_q, p_max), lengths.clone()
        extra = {k: inputs[k] for k in _ROPE_KEYS if k in inputs}
        positions, deltas = self.rope_index(input_ids, attention_mask=valid.long(), **extra)  # [3, N, P], [N, 1]
        return positions, lengths + deltas.view(-1).to(lengths.device)

    def _forward(self, cache, positions: torch.Tensor, *, attend: bool = True, **inputs) -> torch.Tensor:
        """Backbone forward through the cache: positions [R, L] (text) or [3, R, L] -> hidden [R, L, D].
        ``attend=False`` leaves the ``r3v_prefix`` keyword out (plain SDPA: prompt prefill)."""
        if self.rope_index is not None and positions.dim() == 2:
            positions = positions.unsqueeze(0).expand(3, -1, -1)     # text tokens: t = h = w position
        if attend:
            inputs["r3v_prefix"] = cache
        inputs[self.cache_keyword] = cache
        return self.backbone(**inputs, position_ids=positions, use_cache=True)

    def _branch_output(self, tokens: list[int], logprobs: list[float]) -> BranchOutput:
        text = self.processor.batch_decode([tokens], skip_special_tokens=True)[0]
        return BranchOutput(tokens, logprobs, text)

    # ------------------------------------------------------------------------- selection
    def _select_prompts(self, prompt: PreparedPrompt, candidates: list[str], select):
        """The select requests of one question (one per k) and how they continue its prompt:
        (requests, shared length C, [select tokens after C per k]), with C None when they
        cannot continue the cached prefix (another image, or image tokens past C)."""
        select_request, select_ks, _, _ = select
        requests = [select_request(prompt.index, candidates[:k]) for k in select_ks]
        # The image was loaded for the CoT prompt already; a select prompt about another image
        # file cannot continue this prefix.
        ids = [self._prepare(prompt.index, r, prompt.image).ids if r.image == prompt.request.image else None
               for r in requests]
        shared = self._shared_length(prompt.ids, ids)
        return requests, shared, (None if shared is None else [x[shared:] for x in ids])

    def _shared_length(self, cot_ids: list[int], select_ids: list[list[int] | None]) -> int | None:
        """Prefix tokens the select prompts share with the CoT prompt (at least one select token
        left over), or None if some prompt has another image or its image is not all inside."""
        if any(ids is None for ids in select_ids):
            return None
        shared = len(cot_ids)
        for ids in select_ids:
            n = 0
            for a, b in zip(cot_ids, ids):
                if a != b:
                    break
                n += 1
            shared = min(shared, n, len(ids) - 1)
        if self.image_token_id is not None:
            if any(self.image_token_id in ids[shared:] for ids in select_ids):
                return None
        return shared if shared > 0 else None
