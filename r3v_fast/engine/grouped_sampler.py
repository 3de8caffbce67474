"""Grouped shared-prefix sampler: groups of questions prefilled together, decoded to the end.

The first shared-prefix scheduler (docs/architecture.md, "The three seams"); the
continuous-batching ``SharedPrefixSampler`` (r3v_fast.engine.shared_sampler) replaces it as
``--sampler shared``, and this one stays as its baseline in tests and benchmarks. Common parts (public API, prompt
plumbing, positions, random draws) live in r3v_fast.engine.prefix_sampling.

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

Stopping and host syncs: a branch ends at the end-of-turn or eos token, or at its token budget
(max_new_tokens). Finished flags live on the device; the host reads them once every
``sync_every`` steps (the only per-step-loop host sync), so the CPU can run ahead of the GPU in
between. The price is at most ``sync_every - 1`` wasted steps after the last branch ends;
tokens after a branch's stop token are discarded.

Batching and memory: requests are taken in order into groups of at most ``batch_size``
questions and, if ``max_batch_tokens`` is set, at most that many reserved KV tokens
(sum of prompt length + branches x max_new_tokens). Within a group, finished branches stay in
the batch, masked, until compaction: at a sync point, if the live branches fit in at most 3/4
of the current [questions x branches] layout, questions with no live branch leave and the
branch buffers are copied into a smaller layout. Masking wastes the compute of dead rows
between syncs; compacting at every finish would copy the branch KV too often. KV held per
question: its prompt (padded to the group's longest) + live branches x the longest live branch.
No question joins a group once it decodes, so a group's last, longest branches decode at low
occupancy: the cost the continuous sampler removes.

CUDA graphs (on CUDA, ``cuda_graphs=None`` = on): a decode step is in-place device work on the
cache's fixed buffers, so after one eager step per branch layout it is captured once and then
replayed; at the small batch sizes of decoding most of an eager step is Python and kernel
launch overhead. The branch buffers then hold the phase's whole max_new_tokens from the start
(at most P + K x L tokens per question). Sampling runs eagerly between replays.

``last_stats`` after a call: groups, prefill tokens, generated tokens, decode steps, decode
tokens (tokens produced by decode forwards, i.e. all but each branch's first), slots
(batch_size x branches: the rows of a full group), peak KV bytes and the seconds until the
last token.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from r3v_fast.engine.prefix_sampling import BranchOutput, PreparedPrompt, PrefixSamplerBase, branch_numbers
from r3v_fast.engine.sampler import SamplingParams, branch_key, request_key, sample_tokens
from r3v_fast.model.prefix_cache import SharedPrefixCache, prefix_attention_enabled

__all__ = ["GroupedPrefixSampler"]

# Select-prompt prefill works on [rows, S, P + S] masks: rows x S x (P + S) stays below this.
_EXTEND_MASK_ELEMENTS = 1 << 25
# Compact the branch layout when the live branches fit in this fraction of it.
_COMPACT_FRACTION = 0.75


class GroupedPrefixSampler(PrefixSamplerBase):
    """Grouped shared-prefix sampler: the ``Sampler`` protocol plus ``sample_and_select``."""

    def __init__(self, model, processor, *, batch_size: int = 8, show_progress: bool = True,
                 max_batch_tokens: int | None = None, sync_every: int = 8, backend: str = "auto",
                 cuda_graphs: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        super().__init__(model, processor, show_progress=show_progress, backend=backend, cuda_graphs=cuda_graphs)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.sync_every = sync_every

    def _run_eval(self, requests, params, temperatures, *, desc, select=None):
        results: list = [None] * len(requests)
        stats = {"peak_kv_bytes": 0, "groups": 0, "prefill_tokens": 0, "generated_tokens": 0,
                 "decode_steps": 0, "decode_tokens": 0, "slots": self.batch_size * len(temperatures),
                 "last_token_s": 0.0, "start": time.perf_counter()}
        bar = tqdm(total=len(requests), desc=desc, unit="question", disable=not self.show_progress,
                   leave=False)
        with prefix_attention_enabled(self.model):
            for group in self._groups(requests, len(temperatures), params.max_new_tokens):
                for prompt, result in zip(group, self._run_group(group, params, temperatures, select, stats)):
                    results[prompt.index] = result
                stats["groups"] += 1
                bar.update(len(group))
        bar.close()
        del stats["start"]
        self.last_stats = stats
        return results

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

    # ------------------------------------------------------------------------- one group
    def _run_group(self, group: Sequence[PreparedPrompt], params: SamplingParams, temperatures, select,
                   stats) -> list:
        device = self.device
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
        numbers = branch_numbers(temperatures)
        keys = torch.tensor([[branch_key(params.seed, request_key(p.request), n) for n in numbers] for p in group],
                            dtype=torch.long, device=device)                              # [Q, K]
        limits = torch.tensor([[self._branch_limit(p.index, b, params.max_new_tokens) for b in range(num_b)]
                               for p in group], device=device)                            # [Q, K]
        tokens, logprobs = self._decode(cache, first_logits[:, None].expand(-1, num_b, -1), next_positions,
                                        temps, keys, limits, params, 0, stats)
        cache.end_branches()
        branches = [[self._branch_output(tokens[q][b], logprobs[q][b]) for b in range(num_b)]
                    for q in range(num_q)]

        selects: list[dict[int, BranchOutput]] = [{} for _ in group]
        if select is not None:
            selects = self._select(cache, group, branches, next_positions - lengths, select, stats)
        stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], cache.peak_bytes)
        return list(zip(branches, selects))

    # ------------------------------------------------------------------------- decoding
    def _decode(self, cache: SharedPrefixCache, first_logits: torch.Tensor, start_positions: torch.Tensor,
                temps: torch.Tensor, keys: torch.Tensor, limits: torch.Tensor, params: SamplingParams,
                start_len: int, stats):
        """Decode every branch of the cache's current layout.

        first_logits [Q, K, V]: the distribution of each branch's first new token;
        start_positions [Q]: position of a branch's suffix token 0; temps [Q, K] (0 = greedy);
        keys [Q, K] int64: each branch's row key for the random draws (``branch_key``);
        limits [Q, K]: each branch's new-token budget;
        start_len: longest suffix already in the cache (select prompts), for capacity.
        Returns (tokens, logprobs): nested lists [Q][K] of the new tokens (cut after a stop).
        """
        device = first_logits.device
        num_q, num_b = num_q_start, num_b_start = temps.shape
        max_new_tokens = int(limits.max()) if limits.numel() else 0
        if max_new_tokens == 0:
            empty = [[[] for _ in range(num_b)] for _ in range(num_q)]
            return empty, [[[] for _ in range(num_b)] for _ in range(num_q)]
        out_tokens = torch.full((num_q, num_b, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros((num_q, num_b, max_new_tokens), dtype=torch.float32, device=device)
        out_q = torch.arange(num_q, device=device)[:, None].expand(num_q, num_b)     # output slot of each row
        out_b = torch.arange(num_b, device=device)[None, :].expand(num_q, num_b)
        stop_ids = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        row_temps, row_keys = temps.contiguous(), keys.expand(num_q, num_b).contiguous()
        any_sampled = bool((temps > 0).any())                                         # once: a host sync

        token, logprob = self._pick(first_logits.reshape(num_q * num_b, -1), row_temps, row_keys, params, 0,
                                    any_sampled)
        token, logprob = token.view(num_q, num_b), logprob.view(num_q, num_b)
        out_tokens[out_q, out_b, 0], out_logprobs[out_q, out_b, 0] = token, logprob
        row_limits = limits.to(device).expand(num_q, num_b).contiguous()
        finished = torch.isin(token, stop_ids) | (row_limits <= 1)                    # [Q, K]
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
                    row_temps, row_keys = row_temps[rows, branches], row_keys[rows, branches]
                    row_limits = row_limits[rows, branches]
                    out_q, out_b = out_q[rows, branches], out_b[rows, branches]
                    start_positions = start_positions[questions]
                    num_q, num_b = branches.shape
                    runner.new_layout()
            cache.ensure_capacity(longest + 1, limit=limit)
            logits = runner.step(token, start_positions)                              # [Q*K, V]
            token, logprob = self._pick(logits, row_temps, row_keys, params, steps, any_sampled)
            token, logprob = token.view(num_q, num_b), logprob.view(num_q, num_b)
            out_tokens[out_q, out_b, steps], out_logprobs[out_q, out_b, steps] = token, logprob
            finished |= torch.isin(token, stop_ids) | (row_limits <= steps + 1)
            longest += 1
            steps += 1
            stats["decode_steps"] += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats["last_token_s"] = time.perf_counter() - stats["start"]
        stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], cache.peak_bytes)

        tokens_host = out_tokens[:, :, :steps].tolist()
        logprobs_host = out_logprobs[:, :, :steps].tolist()
        stops = set(self.stop_ids)
        limits_host = limits.expand(num_q_start, num_b_start).tolist()
        for q, per_branch in enumerate(tokens_host):
            for b, seq in enumerate(per_branch):
                seq = seq[:limits_host[q][b]]
                end = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
                per_branch[b] = seq[:end]
                logprobs_host[q][b] = logprobs_host[q][b][:end]
                stats["generated_tokens"] += end
                stats["decode_tokens"] += max(end - 1, 0)
        return tokens_host, logprobs_host

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

    @staticmethod
    def _pick(logits: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor, params: SamplingParams, step: int,
              any_sampled: bool):
        """Next token [Q*K] and its log-probability of every branch: logits [Q*K, V] float32,
        temps / keys [Q, K]; step: tokens each branch generated before (the same for all)."""
        steps = torch.full((keys.numel(),), step, dtype=torch.long, device=keys.device)
        return sample_tokens(logits, temps.reshape(-1), params, keys.reshape(-1), steps, any_sampled=any_sampled)

    # ------------------------------------------------------------------------- selection
    def _select(self, cache, group, branches, rope_deltas, select, stats) -> list[dict]:
        """Select prompts of the group as new branches of the cached prefixes, decoded greedily
        (or with select_params' temperature). Prompts that do not share the CoT prompt's prefix
        through its image fall back to a from-scratch decode."""
        _, select_ks, select_params, num_candidates = select
        out: list[dict[int, BranchOutput]] = [{} for _ in group]
        plans, fallback = [], []
        for q, prompt in enumerate(group):
            # Branch 0 is the greedy answer; the candidates follow it, or are copies of it when
            # nothing is sampled (the contract of sample_and_select).
            cands = ([b.text for b in branches[q][1:]] if len(branches[q]) > 1
                     else [branches[q][0].text] * num_candidates)
            requests, shared, tokens = self._select_prompts(prompt, cands, select)
            if shared is None:
                fallback += [(q, k, r) for k, r in zip(select_ks, requests)]
            else:
                keys = [branch_key(select_params.seed, request_key(r), 0) for r in requests]
                plans.append((q, shared, tokens, keys))
        if plans:
            decoded = self._select_branches(cache, plans, rope_deltas, select_params, stats)
            for (q, *_), per_k in zip(plans, decoded):
                out[q] = dict(zip(select_ks, per_k))
        if fallback:
            params = SamplingParams(**{**select_params.__dict__, "k": 1})
            temperatures = [max(params.temperature, 0.0)]
            answers = self._run([r for _, _, r in fallback], params, temperatures, desc="select (fresh)")
            for (q, k, _), (branches, _) in zip(fallback, answers):
                out[q][k] = branches[0]
        return out

    def _select_branches(self, cache, plans, rope_deltas, select_params, stats):
        """plans: [(question row, shared length C, [select tokens after C, per k], [row key per k])]
        -> [[BranchOutput per k] per plan]."""
        device = self.device
        num_q, num_k = len(plans), len(plans[0][2])
        rows = torch.tensor([q for q, *_ in plans], device=device)
        shared = torch.tensor([c for _, c, _, _ in plans], device=device)            # [Q]
        new_lens = torch.tensor([[len(t) for t in toks] for _, _, toks, _ in plans], device=device)  # [Q, K]
        keys = torch.tensor([k for *_, k in plans], dtype=torch.long, device=device)  # [Q, K]
        longest = max(len(t) for _, _, toks, _ in plans for t in toks)
        max_new = select_params.max_new_tokens
        cache.begin_branches(rows, shared, num_k, capacity=longest + min(max_new, 64))
        start_positions = shared + rope_deltas[rows]                                  # position of select token 0
        p_max = cache.layers[0].prefix_keys.shape[2]
        per_chunk = max(1, _EXTEND_MASK_ELEMENTS // max(1, num_k * longest * (p_max + longest)))
        first_logits = []
        for q0 in range(0, num_q, per_chunk):
            q1 = min(num_q, q0 + per_chunk)
            chunk = [t for _, _, toks, _ in plans[q0:q1] for t in toks]
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
        limits = torch.full((num_q, num_k), max_new, device=device)
        tokens, logprobs = self._decode(cache, torch.cat(first_logits), start_positions, temps, keys, limits,
                                        select_params, longest, stats)
        cache.end_branches()
        return [[self._branch_output(tokens[q][k], logprobs[q][k]) for k in range(num_k)]
                for q in range(num_q)]


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

    def __init__(self, sampler: GroupedPrefixSampler, cache: SharedPrefixCache, use_graph: bool):
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
            warnings.warn(f"grouped shared-prefix sampler: CUDA graph capture failed ({err}); decoding eagerly",
                          RuntimeWarning, stacklevel=2)
            self.use_graph = self.sampler.cuda_graphs = False
            self.cache.mode = None
            return
        self.graph, self.static_token, self.static_start, self.static_logits = (
            graph, static_token, static_start, logits)
