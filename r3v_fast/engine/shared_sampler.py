"""Shared-prefix sampler (``--sampler shared``): one prefill per image + question, K branches.

The public R³V code samples K solutions as K full passes that each re-encode the image and
the question, and test-time selection re-encodes them once more. Here (DESIGN §2, issue 7):

1. **Prefill once.** The prompts of a group of questions are prefilled together (right-padded,
   vision encoder once per image) into a ``SharedPrefixCache``: one copy of each prompt's KV.
2. **Decode branches.** All branches of all questions in the group step together, one token
   each per forward; each branch attends to its question's prefix (read once per question as
   a matrix by the cascade decode kernel) plus its own tokens. ``sample_and_select`` decodes
   the greedy answer as one more branch of the same prefix, next to the K sampled ones.
3. **Select on the cached prefix.** The select prompt of question i (candidates 1..k plus the
   instruction) starts with the same tokens as the CoT prompt up to the end of the question and
   CoT instruction (r3v_fast.data.prompts). Only its tokens after that common prefix are
   prefilled, as a new branch that reads the first C tokens of the cached prefix, and then
   decoded greedily. select@k for every k comes from one sampling pass with K_max candidates.

Positions: a branch token continues its prefix. For Qwen2-VL / Qwen2.5-VL M-RoPE the next text
position after a prompt of P tokens is P + rope_delta (``get_rope_index`` of the model gives
the 3-D positions of the prompt and the delta), and all three rope rows of a text token are
equal; the select branch's token at prompt index C + s sits at C + s + rope_delta. LLaVA uses
plain 1-D positions.

Sampling: temperature, then top-k, then top-p (transformers' order and conventions), then one
draw per branch by the exponential-race trick (argmax of p / E, E ~ Exp(1): an exact draw from
p that needs no cumulative search) from a ``torch.Generator`` seeded with
``seed * 1_000_003 + group number``, so a run is reproducible for a fixed seed and batch
composition. Temperature 0 is greedy (argmax of the raw logits, as ``generate``).

Stopping and host syncs: a branch ends at the end-of-turn or eos token, or at max_new_tokens.
Finished flags live on the device; the host reads them once every ``sync_every`` steps (the
only per-step-loop host sync), so the CPU can run ahead of the GPU in between. The price is at
most ``sync_every - 1`` wasted steps after the last branch ends; tokens after a branch's stop
token are discarded.

Batching and memory: requests are taken in order into groups of at most ``batch_size``
questions and, if ``max_batch_tokens`` is set, at most that many reserved KV tokens
(sum of prompt length + branches x max_new_tokens). Within a group, finished branches stay in
the batch, masked, until compaction: at a sync point, if the live branches fit in at most 3/4
of the current [questions x branches] layout, questions with no live branch leave and the
branch buffers are copied into a smaller layout. Masking wastes the compute of dead rows
between syncs; compacting at every finish would copy the branch KV too often. KV held per
question: its prompt (padded to the group's longest) + live branches x the longest live branch.

CUDA graphs (on CUDA, ``cuda_graphs=None`` = on): a decode step is in-place device work on the
cache's fixed buffers, so after one eager step per branch layout it is captured once and then
replayed; at the small batch sizes of decoding most of an eager step is Python and kernel
launch overhead. The branch buffers then hold the phase's whole max_new_tokens from the start
(at most P + K x L tokens per question). Sampling runs eagerly between replays.

Outputs are decoded exactly like HFSampler (``batch_decode(..., skip_special_tokens=True)`` of
the new tokens up to and including the stop token), so the two samplers are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from r3v_fast.engine.sampler import Request, SamplingParams, load_images
from r3v_fast.model.loading import end_of_turn_id, lm_head_and_backbone, pad_id, unwrap_peft
from r3v_fast.model.prefix_cache import SharedPrefixCache, prefix_attention_enabled

__all__ = ["SharedPrefixSampler", "BranchOutput"]

# Token-sequence inputs of a processor (right-padded when prompts are batched).
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# Multimodal keys that ``get_rope_index`` of the Qwen-VL models reads.
_ROPE_KEYS = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
# Select-prompt prefill works on [rows, S, P + S] masks: rows x S x (P + S) stays below this.
_EXTEND_MASK_ELEMENTS = 1 << 25
# Compact the branch layout when the live branches fit in this fraction of it.
_COMPACT_FRACTION = 0.75


@dataclass
class BranchOutput:
    """One decoded branch: new token ids (up to and including the stop token, if any), the
    log-probability of each under the model's raw distribution, and the decoded text."""

    tokens: list[int]
    logprobs: list[float]
    text: str


@dataclass
class _Prompt:
    index: int                       # position in the caller's request list
    request: Request
    image: object                    # PIL image
    inputs: dict                     # processor output for this request alone (batch of 1, CPU)
    ids: list[int]                   # its input ids


class SharedPrefixSampler:
    """Shared-prefix sampler: the ``Sampler`` protocol plus ``sample_and_select``."""

    def __init__(self, model, processor, *, batch_size: int = 8, show_progress: bool = True,
                 max_batch_tokens: int | None = None, sync_every: int = 8, backend: str = "auto",
                 cuda_graphs: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.max_batch_tokens = max_batch_tokens
        self.sync_every = sync_every
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.stop_ids = sorted({end_of_turn_id(processor), processor.tokenizer.eos_token_id} - {None})
        self.pad_id = pad_id(processor)
        self.lm_head, self.backbone = lm_head_and_backbone(model)
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

    # ------------------------------------------------------------------------- the run
    def _run(self, requests, params, temperatures, *, desc, select=None):
        """[(BranchOutput per temperature, {k: select BranchOutput}) per request]."""
        if not requests:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            return self._run_eval(requests, params, temperatures, desc=desc, select=select)
        finally:
            self.model.train(was_training)

    def _run_eval(self, requests, params, temperatures, *, desc, select=None):
        results: list = [None] * len(requests)
        stats = {"peak_kv_bytes": 0, "groups": 0, "prefill_tokens": 0, "generated_tokens": 0,
                 "decode_steps": 0}
        bar = tqdm(total=len(requests), desc=desc, unit="question", disable=not self.show_progress,
                   leave=False)
        with prefix_attention_enabled(self.model):
            for group_no, group in enumerate(self._groups(requests, len(temperatures), params.max_new_tokens)):
                generator_seed = params.seed * 1_000_003 + group_no
                for prompt, result in zip(group, self._run_group(group, params, temperatures, generator_seed,
                                                                 select, stats)):
                    results[prompt.index] = result
                stats["groups"] += 1
                bar.update(len(group))
        bar.close()
        self.last_stats = stats
        return results

    def _prepare(self, index: int, request: Request, image=None) -> _Prompt:
        image = load_images([request])[0] if image is None else image
        inputs = dict(self.processor(text=[request.prompt], images=[image], return_tensors="pt"))
        return _Prompt(index, request, image, inputs, inputs["input_ids"][0].tolist())

    def _groups(self, requests, num_branches: int, max_new_tokens: int):
        """Requests in order, processed one at a time, grouped by batch_size and token budget.
        A full group is handed out before the next request's image is loaded, so at most one
        group's images are held at a time (a group closed by the token budget holds one more)."""
        group, reserved = [], 0
        for index, request in enumerate(requests):
            if len(group) >= self.batch_size:
                yield group
                group, reserved = [], 0
            prompt = self._prepare(index, request)
            need = len(prompt.ids) + num_branches * max_new_tokens
            if group and self.max_batch_tokens is not None and reserved + need > self.max_batch_tokens:
                yield group
                group, reserved = [], 0
            group.append(prompt)
            reserved += need
        if group:
            yield group

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def _collate(self, prompts: Sequence[_Prompt]) -> dict:
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

    # ------------------------------------------------------------------------- one group
    def _run_group(self, group: Sequence[_Prompt], params: SamplingParams, temperatures, seed: int,
                   select, stats) -> list:
        device = self.device
        generator = torch.Generator(device=device).manual_seed(seed)
        cache = SharedPrefixCache(self.num_layers, backend=self.backend)
        lengths = torch.tensor([len(p.ids) for p in group], device=device)         # [N]

        # 1. prefill: prompts once, right-padded; the cache keeps one copy of each.
        inputs = self._collate(group)
        positions, next_positions = self._prompt_positions(inputs, lengths)
        model_inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        cache.begin_prefill()
        # No r3v_prefix keyword: the decoder's attention is then plain causal SDPA (right padding
        # needs no mask) and the vision tower sees no foreign keyword; the cache still stores.
        hidden = self._forward(cache, positions, attend=False, **model_inputs)     # [N, P_max, D]
        last = hidden[torch.arange(len(group), device=device), lengths - 1]        # [N, D]
        first_logits = self.lm_head(last).float()                                  # [N, V]
        del hidden, last, inputs, model_inputs
        stats["prefill_tokens"] += int(sum(len(p.ids) for p in group))

        # 2. the branches: one per temperature, all reading the prefix.
        num_q, num_b = len(group), len(temperatures)
        cache.begin_branches(torch.arange(num_q, device=device), lengths, num_b,
                             capacity=min(params.max_new_tokens, 64))
        temps = torch.tensor(temperatures, dtype=torch.float32, device=device).expand(num_q, num_b)
        tokens, logprobs = self._decode(cache, first_logits[:, None].expand(-1, num_b, -1), next_positions,
                                        temps, params, params.max_new_tokens, 0, generator, stats)
        cache.end_branches()
        branches = [[self._branch_output(tokens[q][b], logprobs[q][b]) for b in range(num_b)]
                    for q in range(num_q)]

        selects: list[dict[int, BranchOutput]] = [{} for _ in group]
        if select is not None:
            selects = self._select(cache, group, branches, next_positions - lengths, select, generator, stats)
        stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], cache.peak_bytes)
        return list(zip(branches, selects))

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

    def _forward(self, cache: SharedPrefixCache, positions: torch.Tensor, *, attend: bool = True,
                 **inputs) -> torch.Tensor:
        """Backbone forward through the cache: positions [R, L] (text) or [3, R, L] -> hidden [R, L, D]."""
        if self.rope_index is not None and positions.dim() == 2:
            positions = positions.unsqueeze(0).expand(3, -1, -1)     # text tokens: t = h = w position
        if attend:
            inputs["r3v_prefix"] = cache
        return self.backbone(**inputs, position_ids=positions, past_key_values=cache, use_cache=True)

    # ------------------------------------------------------------------------- decoding
    def _decode(self, cache: SharedPrefixCache, first_logits: torch.Tensor, start_positions: torch.Tensor,
                temps: torch.Tensor, params: SamplingParams, max_new_tokens: int, start_len: int,
                generator: torch.Generator, stats):
        """Decode every branch of the cache's current layout.

        first_logits [Q, K, V]: the distribution of each branch's first new token;
        start_positions [Q]: position of a branch's suffix token 0; temps [Q, K] (0 = greedy);
        start_len: longest suffix already in the cache (select prompts), for capacity.
        Returns (tokens, logprobs): nested lists [Q][K] of the new tokens (cut after a stop).
        """
        device = first_logits.device
        num_q, num_b = temps.shape
        if max_new_tokens == 0:
            empty = [[[] for _ in range(num_b)] for _ in range(num_q)]
            return empty, [[[] for _ in range(num_b)] for _ in range(num_q)]
        out_tokens = torch.full((num_q, num_b, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros((num_q, num_b, max_new_tokens), dtype=torch.float32, device=device)
        out_q = torch.arange(num_q, device=device)[:, None].expand(num_q, num_b)     # output slot of each row
        out_b = torch.arange(num_b, device=device)[None, :].expand(num_q, num_b)
        stop_ids = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        any_sampled = bool((temps > 0).any())
        row_temps = temps.contiguous()

        token, logprob = self._pick(first_logits.reshape(num_q * num_b, -1), row_temps.reshape(-1),
                                    params, generator, any_sampled)
        token, logprob = token.view(num_q, num_b), logprob.view(num_q, num_b)
        out_tokens[out_q, out_b, 0], out_logprobs[out_q, out_b, 0] = token, logprob
        finished = torch.isin(token, stop_ids)                                        # [Q, K]
        longest, steps = start_len, 1
        limit = start_len + max_new_tokens
        runner = _DecodeRunner(self, cache, self._use_graphs(device))
        if runner.use_graph:   # fixed buffers for the graph: reserve the whole phase up front
            cache.ensure_capacity(limit - 1, limit=limit)
        while steps < max_new_tokens:
            if steps % self.sync_every == 0:
                done = finished.cpu()                                                 # the host sync
                if bool(done.all()):
                    break
                layout = self._compaction(done)
                if layout is not None:
                    questions, branches = (t.to(device) for t in layout)
                    rows = questions[:, None]
                    cache.select(questions, branches)
                    token, finished = token[rows, branches], finished[rows, branches]
                    row_temps = row_temps[rows, branches]
                    out_q, out_b = out_q[rows, branches], out_b[rows, branches]
                    start_positions = start_positions[questions]
                    num_q, num_b = branches.shape
                    runner.new_layout()
            cache.ensure_capacity(longest + 1, limit=limit)
            logits = runner.step(token, start_positions)                              # [Q*K, V]
            token, logprob = self._pick(logits, row_temps.reshape(-1), params, generator, any_sampled)
            token, logprob = token.view(num_q, num_b), logprob.view(num_q, num_b)
            out_tokens[out_q, out_b, steps], out_logprobs[out_q, out_b, steps] = token, logprob
            finished |= torch.isin(token, stop_ids)
            longest += 1
            steps += 1
            stats["decode_steps"] += 1
        stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], cache.peak_bytes)

        tokens_host = out_tokens[:, :, :steps].tolist()
        logprobs_host = out_logprobs[:, :, :steps].tolist()
        stops = set(self.stop_ids)
        for q, per_branch in enumerate(tokens_host):
            for b, seq in enumerate(per_branch):
                end = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
                per_branch[b] = seq[:end]
                logprobs_host[q][b] = logprobs_host[q][b][:end]
                stats["generated_tokens"] += end
        return tokens_host, logprobs_host

    def _use_graphs(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        return True if self.cuda_graphs is None else bool(self.cuda_graphs)

    def _decode_forward(self, cache: SharedPrefixCache, token: torch.Tensor,
                        start_positions: torch.Tensor) -> torch.Tensor:
        """One decode forward: token [Q, K] -> logits [Q*K, V] float32. Device work only: no
        host sync, no tensor kept across calls but the cache's (so it can be graph-captured)."""
        cache.begin_decode()
        positions = start_positions[:, None] + cache.suffix_lens                     # [Q, K]
        hidden = self._forward(cache, positions.reshape(-1, 1), input_ids=token.reshape(-1, 1))
        cache.end_decode()
        return self.lm_head(hidden[:, -1]).float()                                    # [Q*K, V]

    @staticmethod
    def _compaction(done: torch.Tensor):
        """(questions [Q'], branches [Q', K']) of a smaller layout holding every live branch, or
        None if it would not shrink the layout below _COMPACT_FRACTION of its size."""
        alive = ~done                                                                 # [Q, K]
        counts = alive.sum(1)
        questions = torch.nonzero(counts > 0).view(-1)
        width = int(counts.max())
        if len(questions) * width > _COMPACT_FRACTION * done.numel():
            return None
        # Live branches first (stable), padded with finished ones of the same question, whose
        # later tokens are ignored.
        order = torch.argsort((~alive[questions]).to(torch.int8), dim=1, stable=True)
        return questions, order[:, :width]

    def _pick(self, logits: torch.Tensor, temps: torch.Tensor, params: SamplingParams,
              generator: torch.Generator, any_sampled: bool):
        """Next token of each row and its log-probability under the raw logits.

        logits [R, V] float32, temps [R] (0 = greedy). Sampling: logits / T, keep the top_k
        (0 = all), then the smallest set of most likely tokens whose probability reaches top_p
        (a token is kept if the mass strictly above it is below top_p, so the most likely one
        always is), then draw by the exponential race on the kept probabilities."""
        token = logits.argmax(dim=-1)                                                 # greedy
        if any_sampled:
            vocab = logits.shape[-1]
            keep = vocab if params.top_k <= 0 else min(params.top_k, vocab)
            scale = torch.where(temps > 0, temps, 1.0)[:, None]
            values, indices = torch.topk(logits / scale, keep, dim=-1)                # [R, k] descending
            probs = torch.softmax(values, dim=-1)
            if params.top_p < 1.0:
                mass_above = torch.cumsum(probs, dim=-1) - probs
                probs = probs.masked_fill(mass_above >= params.top_p, 0.0)
            race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)
            drawn = indices.gather(1, (probs / race).argmax(dim=-1, keepdim=True)).squeeze(1)
            token = torch.where(temps > 0, drawn, token)
        # log p(token) = logit - logsumexp(logits): the log-softmax at one entry, without a
        # second [R, V] tensor.
        return token, logits.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    def _branch_output(self, tokens: list[int], logprobs: list[float]) -> BranchOutput:
        text = self.processor.batch_decode([tokens], skip_special_tokens=True)[0]
        return BranchOutput(tokens, logprobs, text)

    # ------------------------------------------------------------------------- selection
    def _select(self, cache, group, branches, rope_deltas, select, generator, stats) -> list[dict]:
        """Select prompts of the group as new branches of the cached prefixes, decoded greedily
        (or with select_params' temperature). Prompts that do not share the CoT prompt's prefix
        through its image fall back to a from-scratch decode."""
        select_request, select_ks, select_params, num_candidates = select
        out: list[dict[int, BranchOutput]] = [{} for _ in group]
        plans, fallback = [], []
        for q, prompt in enumerate(group):
            # Branch 0 is the greedy answer; the candidates follow it, or are copies of it when
            # nothing is sampled (the contract of sample_and_select).
            cands = ([b.text for b in branches[q][1:]] if len(branches[q]) > 1
                     else [branches[q][0].text] * num_candidates)
            requests = [select_request(prompt.index, cands[:k]) for k in select_ks]
            # The image was loaded for the CoT prompt already; a select prompt about another
            # image file cannot continue this prefix.
            ids = [self._prepare(prompt.index, r, prompt.image).ids if r.image == prompt.request.image else None
                   for r in requests]
            shared = self._shared_length(prompt.ids, ids)
            if shared is None:
                fallback += [(q, k, r) for k, r in zip(select_ks, requests)]
            else:
                plans.append((q, shared, [x[shared:] for x in ids]))
        if plans:
            decoded = self._select_branches(cache, plans, rope_deltas, select_params, generator, stats)
            for (q, _, _), per_k in zip(plans, decoded):
                out[q] = dict(zip(select_ks, per_k))
        if fallback:
            params = SamplingParams(**{**select_params.__dict__, "k": 1})
            temperatures = [max(params.temperature, 0.0)]
            answers = self._run([r for _, _, r in fallback], params, temperatures, desc="select (fresh)")
            for (q, k, _), (branches, _) in zip(fallback, answers):
                out[q][k] = branches[0]
        return out

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

    def _select_branches(self, cache, plans, rope_deltas, select_params, generator, stats):
        """plans: [(question row, shared length C, [select tokens after C, per k])] ->
        [[text per k] per plan]."""
        device = self.device
        num_q, num_k = len(plans), len(plans[0][2])
        rows = torch.tensor([q for q, _, _ in plans], device=device)
        shared = torch.tensor([c for _, c, _ in plans], device=device)               # [Q]
        new_lens = torch.tensor([[len(t) for t in toks] for _, _, toks in plans], device=device)  # [Q, K]
        longest = max(len(t) for _, _, toks in plans for t in toks)
        max_new = select_params.max_new_tokens
        cache.begin_branches(rows, shared, num_k, capacity=longest + min(max_new, 64))
        start_positions = shared + rope_deltas[rows]                                  # position of select token 0
        p_max = cache.layers[0].prefix_keys.shape[2]
        per_chunk = max(1, _EXTEND_MASK_ELEMENTS // max(1, num_k * longest * (p_max + longest)))
        first_logits = []
        for q0 in range(0, num_q, per_chunk):
            q1 = min(num_q, q0 + per_chunk)
            chunk = [t for _, _, toks in plans[q0:q1] for t in toks]
            width = max(len(t) for t in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for r, t in enumerate(chunk):
                input_ids[r, :len(t)] = torch.tensor(t)
            input_ids = input_ids.to(device)
            positions = (start_positions[q0:q1, None, None]
                         + torch.arange(width, device=device)).expand(q1 - q0, num_k, width).reshape(-1, width)
            cache.begin_extend(q0, q1, new_lens[q0:q1])
            hidden = self._forward(cache, positions, input_ids=input_ids)             # [rows, S, D]
            chunk_lens = new_lens[q0:q1].reshape(-1)
            last = hidden[torch.arange(len(chunk), device=device), chunk_lens - 1]     # [rows, D]
            first_logits.append(self.lm_head(last).float().view(q1 - q0, num_k, -1))
            stats["prefill_tokens"] += int(chunk_lens.sum())
            del hidden
        cache.mode = None
        temps = torch.full((num_q, num_k), max(select_params.temperature, 0.0), device=device)
        tokens, logprobs = self._decode(cache, torch.cat(first_logits), start_positions, temps, select_params,
                                        max_new, longest, generator, stats)
        cache.end_branches()
        return [[self._branch_output(tokens[q][k], logprobs[q][k]) for k in range(num_k)]
                for q in range(num_q)]

    # ------------------------------------------------------------------------- for tests
    @torch.no_grad()
    def _sample_branches(self, requests: Sequence[Request], params: SamplingParams) -> list[list[BranchOutput]]:
        """Like ``sample`` but returns token ids and per-token log-probabilities as well."""
        temperatures = [max(params.temperature, 0.0)] * params.k
        return [branches for branches, _ in self._run(requests, params, temperatures, desc="sampling")]


class _DecodeRunner:
    """Runs decode forwards of one branch layout, eagerly or replayed from a CUDA graph.

    With graphs, the first step of a layout runs eagerly (it compiles the Triton kernels and
    warms cuBLAS outside the capture), the second captures the forward (token in a static
    buffer; positions, cache writes and length updates are all in-place device work on the
    cache's fixed buffers) and every later step is one ``replay``: the decode step then costs
    no Python or launch overhead, which at small batch sizes is most of a step. A layout change
    (compaction) drops the graph. The returned logits of a replayed step live in the graph's
    static output until the next step. If capture fails, decoding goes on eagerly.
    """

    def __init__(self, sampler: SharedPrefixSampler, cache: SharedPrefixCache, use_graph: bool):
        self.sampler, self.cache, self.use_graph = sampler, cache, use_graph
        self.new_layout()

    def new_layout(self) -> None:
        self.graph = self.static_token = self.static_logits = self.static_start = None
        self.warm = False

    def step(self, token: torch.Tensor, start_positions: torch.Tensor) -> torch.Tensor:
        if not self.use_graph or not self.warm:
            self.warm = True
            return self.sampler._decode_forward(self.cache, token, start_positions)
        if self.graph is None:
            self._capture(token, start_positions)
            if self.graph is None:
                return self.sampler._decode_forward(self.cache, token, start_positions)
        self.static_token.copy_(token)
        self.graph.replay()
        return self.static_logits

    def _capture(self, token: torch.Tensor, start_positions: torch.Tensor) -> None:
        import warnings

        static_token, static_start = token.clone(), start_positions.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            # Capture records without executing: the cache is unchanged afterwards.
            with torch.cuda.graph(graph):
                logits = self.sampler._decode_forward(self.cache, static_token, static_start)
        except RuntimeError as err:   # keep sampling, just without graphs
            warnings.warn(f"shared-prefix sampler: CUDA graph capture failed ({err}); decoding eagerly",
                          RuntimeWarning, stacklevel=2)
            self.use_graph = self.sampler.cuda_graphs = False
            self.cache.mode = None
            return
        self.graph, self.static_token, self.static_start, self.static_logits = (
            graph, static_token, static_start, logits)
