"""Shared-prefix sampler (``--sampler shared``): continuous batching over a paged KV pool.

K solutions per question share one prefill of the image + question (docs/architecture.md,
"Where the time and memory go"): each branch attends to its question's prefix KV, stored
once, plus its own tokens. Rationales differ in length from a few dozen to hundreds of
tokens, so a batch that decodes until its longest branch ends spends its tail at low
occupancy. Here the batch never waits:

- **Decode slots.** A fixed number of slots (``max_slots``) decode one token each per forward.
  When a branch ends, its slot takes the next branch: a waiting branch of a question already
  prefilled, or a branch of a newly admitted question. Admission happens at the host-sync
  points: every ``sync_every`` decode steps the host reads which branches ended, frees them,
  prefills waiting questions (right-padded batches of at most ``max_prefill_tokens``; the
  vision encoder runs once per image), draws their branches' first tokens from the prompt's
  last logits and lets the branches join the running decode.
- **Paged KV.** Prefix and branch KV live in ``kv_block_size``-token blocks of one pool
  (r3v_fast.model.paged_cache); a question's prefix blocks are read by all its branches, and
  the paged cascade kernel reads them once per question, each branch's blocks once per branch.
  Admission needs no contiguous buffer, a branch's blocks are freed the moment it ends, and
  memory follows the tokens actually held, not the longest branch. Blocks are reserved at each
  sync for the next ``sync_every`` tokens of every running branch. If the pool
  (``kv_budget_tokens``) runs short, the most recently admitted question is preempted: its
  blocks are freed and it waits to be prefilled again, and since draws do not depend on
  batching (below) its unfinished branches come out the same when it reruns.
- **Select on the cached prefix.** In ``sample_and_select``, when a question's candidates have
  all ended, its select prompts (one per k: candidates 1..k plus the instruction) become new
  branches of the same question: the tokens they share with the CoT prompt are read from its
  cached prefix blocks, only the rest is prefilled (an "extend" forward), and they decode
  greedily in free slots next to other questions' branches. A select prompt that does not
  continue the cached prefix (another image) is decoded from scratch after the run.
- **Batch-independent draws.** ``r3v_fast.engine.sampler.sample_tokens``: transformers'
  warpers, then the exponential race on noise keyed by (seed, request key, branch number,
  step); so a request's samples are the same alone, in any batch, after a preemption, and
  equal to ``HFSampler``'s and the grouped sampler's.

Host syncs: the decode loop reads device data only at sync points (which slots finished, their
tokens). Between them, slots whose branch already ended keep decoding (their tokens are cut
after the stop token), at most ``sync_every - 1`` wasted steps per branch. Sync points also
come early when every running branch reaches its token budget.

Layout at each sync: running branches are packed into slots [0, n) grouped by question (so a
question row's slots are contiguous), question rows into [0, rows). Moving a branch to another
slot moves its block-table row and a few scalars, never its KV. Per-slot state (last token,
lengths, budgets, temperatures, row keys, output rows) lives in device buffers.

CUDA graphs (on CUDA, ``cuda_graphs=None`` = on): a decode step is in-place device work on
fixed buffers (the token buffer, the cache's block tables and lengths), so it is captured once
per slot count bucket (powers of two up to ``max_slots``: the batch shrinks in the last tail)
and replayed; tables are rewritten between replays, never reallocated (a table that must grow
drops the graphs). Sampling runs eagerly between replays.

The pool, the slot buffers and the graphs outlive a call (the sampler keeps them while a call
fits them), so a phase that samples chunk after chunk captures its graphs once.

``last_stats`` after a call: prefill tokens and forwards, generated tokens, decode steps,
decode tokens (tokens produced by decode forwards, i.e. all but each branch's first), slots,
peak KV bytes (blocks in use at the peak x bytes per block), the pool's bytes, preemptions, the
seconds until the last token, and the steady state: decode steps while questions waited for
slots and the occupancy in them. Mean decode occupancy = decode tokens / (decode steps x slots).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from r3v_fast.engine.prefix_sampling import BranchOutput, PreparedPrompt, PrefixSamplerBase, branch_numbers
from r3v_fast.engine.sampler import SamplingParams, branch_key, request_key, sample_tokens
from r3v_fast.model.paged_cache import SCRATCH_BLOCK, PagedPrefixCache
from r3v_fast.model.prefix_cache import prefix_attention_enabled

__all__ = ["SharedPrefixSampler", "BranchOutput"]

# Select-prompt prefill works on [rows, S, P + S] masks: rows x S x (P + S) stays below this.
_EXTEND_MASK_ELEMENTS = 1 << 25
# The smallest slot-count bucket captured as a CUDA graph.
_MIN_BUCKET = 8


@dataclass(eq=False)
class _Branch:
    """One branch of a question: a sampled (or greedy) CoT solution, or a select answer."""

    question: "_Question"
    number: int                       # output position (CoT: index into temperatures; select: k)
    temperature: float
    key: int                          # row key of its random draws
    limit: int                        # new-token budget
    is_select: bool = False
    prompt_tokens: list[int] = field(default_factory=list)   # select: tokens after the shared part
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    kv_len: int = 0                   # tokens of this branch in the cache
    generated: int = 0                # tokens drawn so far (the host's count; the device's is ahead)
    blocks: list[int] = field(default_factory=list)
    state: str = "new"                # new (needs its first token) | ready | running | done
    slot: int | None = None           # slot in the current layout
    out_row: int | None = None        # row of the device output buffer
    start_step: int = 0               # the run's decode step at which it joined the slots

    def reset(self) -> None:
        """Back to the start (after a preemption): same draws when it runs again."""
        self.tokens, self.logprobs, self.kv_len, self.generated, self.blocks = [], [], 0, 0, []
        self.state, self.slot, self.out_row = "new", None, None


@dataclass(eq=False)
class _Question:
    prompt: PreparedPrompt
    branches: list[_Branch] = field(default_factory=list)    # CoT branches, one per temperature
    selects: list[_Branch] = field(default_factory=list)     # select branches, one per k
    phase: str = "cot"                # cot | select | done
    prefix_blocks: list[int] = field(default_factory=list)
    read_len: int = 0                 # prefix tokens the running branches read (P, or C for select)
    start_position: int = 0           # position of CoT token 0: P + rope delta
    shared: int = 0                   # select: tokens shared with the CoT prompt (C)
    admitted: int = -1                # admission order (-1: not resident)

    @property
    def active(self) -> list[_Branch]:
        return self.selects if self.phase == "select" else self.branches


class SharedPrefixSampler(PrefixSamplerBase):
    """Continuous-batching shared-prefix sampler: the ``Sampler`` protocol plus ``sample_and_select``.

    batch_size: the questions whose branches fill the slots by default (``max_slots`` = None
    means batch_size x branches per question of the call, the rows a grouped batch would
    decode). max_slots: decode slots (branches decoded per forward). kv_block_size: tokens
    per KV block. kv_budget_tokens: the pool's size in tokens, all layers (None: enough for
    every slot's token budget plus two prompts per question that fills the slots).
    max_prefill_tokens: prompt tokens per prefill forward. sync_every: decode steps between
    host syncs. backend: cascade attention backend; cuda_graphs: None = on for CUDA.
    """

    def __init__(self, model, processor, *, batch_size: int = 8, show_progress: bool = True,
                 max_slots: int | None = None, kv_block_size: int = 16, kv_budget_tokens: int | None = None,
                 max_prefill_tokens: int = 8192, sync_every: int = 8, backend: str = "auto",
                 cuda_graphs: bool | None = None):
        for name, value in (("batch_size", batch_size), ("kv_block_size", kv_block_size),
                            ("max_prefill_tokens", max_prefill_tokens), ("sync_every", sync_every)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        super().__init__(model, processor, show_progress=show_progress, backend=backend, cuda_graphs=cuda_graphs)
        self.batch_size = batch_size
        self.max_slots = max_slots
        self.kv_block_size = kv_block_size
        self.kv_budget_tokens = kv_budget_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.sync_every = sync_every
        self._engine: _Engine | None = None          # device state kept between calls

    def _run_eval(self, requests, params, temperatures, *, desc, select=None):
        with prefix_attention_enabled(self.model):
            run = _Run(self, requests, params, temperatures, select, desc)
            results = run.execute()
        self.last_stats = run.stats
        if run.fallback:   # select prompts that do not continue their CoT prompt: from scratch
            _, _, select_params, _ = select
            params1 = SamplingParams(**{**select_params.__dict__, "k": 1})
            answers = self._run([r for _, _, r in run.fallback], params1, [max(params1.temperature, 0.0)],
                                desc="select (fresh)")
            for (index, k, _), (branches, _) in zip(run.fallback, answers):
                results[index][1][k] = branches[0]
            self.last_stats = run.stats
        return results


class _Run:
    """The state of one ``_run_eval`` call: questions, branches, slots, blocks, device buffers."""

    def __init__(self, sampler: SharedPrefixSampler, requests, params: SamplingParams, temperatures, select, desc):
        self.s = sampler
        self.params = params
        self.temperatures = list(temperatures)
        self.select = select
        self.device = sampler.device
        self.block = sampler.kv_block_size
        self.ahead = sampler.sync_every
        self.numbers = branch_numbers(temperatures)
        num_select = len(select[1]) if select else 0
        self.select_params = select[2] if select else None
        self.width = max(len(temperatures), num_select)                  # slots a question row may hold
        self.num_slots = sampler.max_slots or sampler.batch_size * len(temperatures)
        self.waiting = collections.deque(range(len(requests)))
        self.requests = list(requests)
        self.questions: dict[int, _Question] = {}
        self.resident: list[_Question] = []                              # prefilled, holding blocks
        self.results: list = [None] * len(requests)
        self.fallback: list = []
        self.admissions = 0
        self.out_width = 1 + max([params.max_new_tokens] + ([self.select_params.max_new_tokens] if select else []))
        self.use_graphs = sampler._use_graphs(self.device)
        self.stats = {"prefill_tokens": 0, "prefill_forwards": 0, "generated_tokens": 0, "decode_steps": 0,
                      "decode_tokens": 0, "slots": self.num_slots, "peak_kv_bytes": 0, "kv_pool_bytes": 0,
                      "preemptions": 0, "last_token_s": 0.0}
        self.start_time = time.perf_counter()
        self.bar = tqdm(total=len(requests), desc=desc, unit="question", disable=not sampler.show_progress,
                        leave=False)
        self.cache: PagedPrefixCache | None = None
        self.steady_steps = 0
        self.spans: list[tuple[int, int]] = []                           # (start step, decode tokens)
        self.layout: list[_Branch] = []                                  # the running branch of each slot

    # ------------------------------------------------------------------------- setup
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block)

    def _make_cache(self, prompt_tokens: int) -> None:
        """Pool and state buffers, sized once the first prompts are known: the sampler's engine
        from an earlier call if it is large enough (its CUDA graphs stay valid), else a new one."""
        s = self.s
        branch_tokens = self.params.max_new_tokens + self.ahead + self.block
        if s.kv_budget_tokens is None:
            # Every slot's token budget, two prompts per question that fills the slots, and room
            # for one question's select branches (prompts that repeat its candidates).
            questions = -(-self.num_slots // len(self.temperatures)) + 1
            budget = self.num_slots * branch_tokens + 2 * questions * (prompt_tokens + self.block)
            if self.select is not None:
                _, select_ks, select_params, _ = self.select
                select_tokens = max(select_ks) * self.params.max_new_tokens + 64 + select_params.max_new_tokens
                budget += len(select_ks) * (select_tokens + self.ahead + self.block)
        else:
            budget = s.kv_budget_tokens
        sizes = dict(num_slots=self.num_slots, width=self.width, block=self.block, out_width=self.out_width,
                     num_blocks=max(2, self._blocks_for(budget) + 1),              # + the scratch block
                     slot_blocks=self._blocks_for(branch_tokens), prefix_blocks=self._blocks_for(prompt_tokens),
                     use_graphs=self.use_graphs)
        engine = s._engine
        if engine is None or not engine.fits(**sizes):
            s._engine = None                                  # free the old pool before the new one
            engine = s._engine = _Engine(s, **sizes)
        self.engine, self.cache, self.runner = engine, engine.cache, engine.runner
        for name in ("token_in", "gen", "limits", "temps", "keys", "base", "is_select", "out_rows", "finished",
                     "out_tokens", "out_logprobs", "stop_ids"):
            setattr(self, name, getattr(engine, name))
        self.num_blocks = engine.cache.num_blocks
        self.free_blocks = list(range(self.num_blocks - 1, SCRATCH_BLOCK, -1))   # pop() gives low ids first
        self.used_blocks = 0
        self.block_bytes = self.cache.block_bytes()
        self.stats["kv_pool_bytes"] = self.cache.nbytes()
        self.free_out_rows = list(range(self.num_slots - 1, -1, -1))

    # ------------------------------------------------------------------------- blocks
    def _take_blocks(self, count: int) -> list[int]:
        taken = [self.free_blocks.pop() for _ in range(count)]
        self.used_blocks += count
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self.used_blocks * self.block_bytes)
        return taken

    def _give_blocks(self, blocks: list[int]) -> None:
        self.free_blocks.extend(reversed(blocks))
        self.used_blocks -= len(blocks)

    def _grow(self, branch: _Branch, tokens: int) -> None:
        """Give the branch blocks for ``tokens`` tokens (caller checked there are enough)."""
        need = self._blocks_for(tokens) - len(branch.blocks)
        if need > 0:
            branch.blocks += self._take_blocks(need)

    # ------------------------------------------------------------------------- the loop
    def execute(self) -> list:
        while self.waiting or self.resident:
            self._sync()
            if not self.layout:
                if self.resident:      # nothing can run: the prefixes held leave no room
                    self._unblock()
                continue
            # Up to the next sync point, or until every running branch reaches its budget.
            steps = min(self.ahead, max(b.limit - b.generated for b in self.layout))
            if self.waiting:   # steady state: questions wait for slots
                self.steady_steps = self.stats["decode_steps"] + steps
            for _ in range(steps):
                self._decode_step(len(self.layout))
            for branch in self.layout:
                branch.kv_len += steps
                branch.generated += steps
        self.bar.close()
        # Occupancy while questions waited: decode tokens of finished branches in those steps.
        steady = self.steady_steps
        useful = sum(max(0, min(start + count, steady) - start) for start, count in self.spans)
        self.stats["steady_decode_steps"] = steady
        self.stats["steady_occupancy"] = useful / (steady * self.num_slots) if steady else None
        return self.results

    def _unblock(self) -> None:
        """No branch could start: free the newest question's blocks (or give up with one left)."""
        if len(self.resident) <= 1:
            raise RuntimeError(
                f"shared-prefix sampler: the KV pool ({self.num_blocks - 1} blocks of {self.block} tokens) "
                f"cannot hold one question and its branches; raise kv_budget_tokens")
        self._preempt(max(self.resident, key=lambda q: q.admitted))

    def _decode_step(self, live: int) -> None:
        n = self.runner.bucket(live, self.num_slots)
        logits = self.runner.step(n)                                              # [n, V] float32
        token, logprob = self._pick(logits, n)
        column = self.gen[:n].clamp(max=self.out_width - 1)                       # past a budget: the spare column
        self.out_tokens[self.out_rows[:n], column] = token
        self.out_logprobs[self.out_rows[:n], column] = logprob
        self.finished[:n] |= torch.isin(token, self.stop_ids) | (self.gen[:n] + 1 >= self.limits[:n])
        self.token_in[:n] = token
        self.gen[:n] += self.cache.slot_live[:n]
        self.stats["decode_steps"] += 1

    def _pick(self, logits: torch.Tensor, n: int):
        """Tokens and log-probs of slots [0, n): CoT rows with the call's params, select rows
        with the select params (a second draw only when those differ)."""
        steps = self.gen[:n]
        token, logprob = sample_tokens(logits, self.temps[:n], self.params, self.keys[:n], steps,
                                       any_sampled=self.any_sampled)
        sel = self.select_params
        if sel is not None and self.any_select_sampled and (sel.top_k, sel.top_p) != (self.params.top_k,
                                                                                       self.params.top_p):
            token2, logprob2 = sample_tokens(logits, self.temps[:n], sel, self.keys[:n], steps, any_sampled=True)
            token = torch.where(self.is_select[:n], token2, token)
            logprob = torch.where(self.is_select[:n], logprob2, logprob)
        return token, logprob

    # ------------------------------------------------------------------------- sync point
    def _sync(self) -> None:
        """Collect finished branches, admit and extend, reserve blocks, rebuild the layout."""
        if self.layout:
            self._collect()
        if self.cache is None:
            self._make_cache(self._peek_prompt_tokens())
        self._start_ready()
        self._start_selects()
        self._admit()
        preempted = self.stats["preemptions"]
        self._reserve()
        if self.stats["preemptions"] > preempted:   # blocks came free: branches that waited may start
            self._start_ready()
            self._start_selects()
            self._reserve()
        self._upload()

    def _peek_prompt_tokens(self) -> int:
        """Longest prompt among the first questions to be admitted (sizes the pool)."""
        count = -(-self.num_slots // len(self.temperatures))
        longest = 1
        for index in list(self.waiting)[:count]:
            longest = max(longest, len(self._question(index).prompt.ids))
        return longest

    def _question(self, index: int) -> _Question:
        question = self.questions.get(index)
        if question is None:
            prompt = self.s._prepare(index, self.requests[index])
            question = _Question(prompt)
            key = request_key(prompt.request)
            for number, (temp, draw) in enumerate(zip(self.temperatures, self.numbers)):
                limit = self.s._branch_limit(index, number, self.params.max_new_tokens)
                question.branches.append(_Branch(question, number, temp, branch_key(self.params.seed, key, draw),
                                                 limit))
            self.questions[index] = question
        return question

    def _collect(self) -> None:
        """Read which slots finished (the host sync) and retire their branches."""
        n = len(self.layout)
        done = self.finished[:n].cpu().tolist()                                   # waits for the steps
        ended = [b for b, d in zip(self.layout, done) if d]
        self.stats["last_token_s"] = time.perf_counter() - self.start_time
        if not ended:
            return
        rows = torch.tensor([b.out_row for b in ended], device=self.device)
        tokens = self.out_tokens[rows].tolist()
        logprobs = self.out_logprobs[rows].tolist()
        stops = set(self.s.stop_ids)
        for branch, seq, lps in zip(ended, tokens, logprobs):
            # Column j holds draw j; draw 0 (the first token) is on the host already.
            seq, lps = seq[1:branch.limit], lps[1:branch.limit]
            end = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
            self._finish(branch, branch.tokens + seq[:end], branch.logprobs + lps[:end], decoded=end)

    def _finish(self, branch: _Branch, tokens: list[int], logprobs: list[float], decoded: int = 0) -> None:
        """A branch ended (at a stop token or its budget): free its slot and blocks."""
        branch.tokens, branch.logprobs, branch.state = tokens, logprobs, "done"
        if decoded:
            self.spans.append((branch.start_step, decoded))
        if branch.out_row is not None:
            self.free_out_rows.append(branch.out_row)
        self._give_blocks(branch.blocks)
        branch.blocks, branch.slot, branch.out_row = [], None, None
        self.stats["generated_tokens"] += len(tokens)
        self.stats["decode_tokens"] += decoded
        question = branch.question
        if all(b.state == "done" for b in question.active):
            self._advance(question)

    def _advance(self, question: _Question) -> None:
        """All running branches of the question ended: start its select phase, or finish it."""
        outputs = [self.s._branch_output(b.tokens, b.logprobs) for b in question.branches]
        if question.phase == "cot" and self.select is not None:
            _, select_ks, select_params, num_candidates = self.select
            candidates = ([o.text for o in outputs[1:]] if len(outputs) > 1 else [outputs[0].text] * num_candidates)
            requests, shared, tokens = self.s._select_prompts(question.prompt, candidates, self.select)
            if shared is not None:
                question.phase, question.shared = "select", shared
                for k, request, extra in zip(select_ks, requests, tokens):
                    key = branch_key(select_params.seed, request_key(request), 0)
                    question.selects.append(_Branch(question, k, max(select_params.temperature, 0.0), key,
                                                    select_params.max_new_tokens, is_select=True,
                                                    prompt_tokens=extra))
                return
            self.fallback += [(question.prompt.index, k, r) for k, r in zip(select_ks, requests)]
        selects = {b.number: self.s._branch_output(b.tokens, b.logprobs) for b in question.selects}
        self.results[question.prompt.index] = (outputs, selects)
        question.phase = "done"
        self._give_blocks(question.prefix_blocks)
        question.prefix_blocks = []
        self.resident.remove(question)
        self.bar.update(1)

    # ------------------------------------------------------------------------- admission
    def _free_slots(self) -> int:
        return self.num_slots - sum(1 for q in self.resident for b in q.active if b.state == "running")

    def _start_ready(self) -> None:
        """Branches whose first token is drawn take free slots, oldest question first."""
        for question in sorted(self.resident, key=lambda q: q.admitted):
            for branch in question.active:
                if branch.state != "ready":
                    continue
                need = max(0, self._blocks_for(branch.kv_len + self.ahead) - len(branch.blocks))
                if self._free_slots() == 0 or not self._room(need):
                    return
                self._grow(branch, branch.kv_len + self.ahead)
                branch.state = "running"
                branch.out_row = self.free_out_rows.pop()

    def _room(self, blocks: int) -> bool:
        """Whether ``blocks`` more blocks fit beside the running branches' next interval."""
        return len(self.free_blocks) - self._growth_need_resident() >= blocks

    def _growth_need_resident(self) -> int:
        return sum(max(0, self._blocks_for(b.kv_len + self.ahead) - len(b.blocks))
                   for q in self.resident for b in q.active if b.state == "running")

    def _waiting_branches(self) -> int:
        """Branches of resident questions that wait for a slot (first token drawn, or a select
        branch before its extend)."""
        return sum(1 for q in self.resident for b in q.active
                   if b.state == "ready" or (b.is_select and b.state == "new"))

    def _admit(self) -> None:
        """Prefill waiting questions while their branches would find free slots and their
        prefix blocks fit; prefill forwards of at most max_prefill_tokens prompt tokens."""
        while self.waiting:
            room = self._free_slots() - self._waiting_branches()
            if room <= 0:
                return
            batch, tokens, branches = [], 0, 0
            while self.waiting and branches < room:
                question = self._question(self.waiting[0])
                length = len(question.prompt.ids)
                if batch and tokens + length > self.s.max_prefill_tokens:
                    break
                todo = [b for b in question.active if b.state != "done"]
                need = self._blocks_for(length) + sum(self._blocks_for(len(b.prompt_tokens) + self.ahead)
                                                      for b in todo)
                if not self._room(need):
                    if not self.resident and not batch:
                        raise RuntimeError(
                            f"shared-prefix sampler: the KV pool ({self.num_blocks - 1} blocks of {self.block} "
                            f"tokens) cannot hold one question ({need} blocks); raise kv_budget_tokens")
                    break
                self.waiting.popleft()
                question.prefix_blocks = self._take_blocks(self._blocks_for(length))
                batch.append(question)
                tokens += length
                branches += len(todo)
            if not batch:
                return
            self._prefill(batch)
            self._start_ready()
            self._start_selects()

    def _prefill(self, batch: list[_Question]) -> None:
        """Prompts of newly admitted questions into their prefix blocks; first tokens drawn."""
        s, device = self.s, self.device
        self._ensure_prefix_width(max(len(q.prefix_blocks) for q in batch))
        prompts = [q.prompt for q in batch]
        lengths = torch.tensor([len(p.ids) for p in prompts], device=device)       # [N]
        inputs = s._collate(prompts)
        positions, next_positions = s._prompt_positions(inputs, lengths)
        width = inputs["input_ids"].shape[1]
        blocks, offsets = self._destinations([(q.prefix_blocks, 0, len(q.prompt.ids)) for q in batch], width)
        self.cache.begin_prefill(blocks, offsets)
        model_inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        hidden = s._forward(self.cache, positions, attend=False, **model_inputs)   # [N, P, D]
        self.cache.end_forward()
        last = hidden[torch.arange(len(batch), device=device), lengths - 1]        # [N, D]
        first_logits = s.lm_head(last).float()                                     # [N, V]
        del hidden, last, inputs, model_inputs
        self.stats["prefill_tokens"] += int(lengths.sum())
        self.stats["prefill_forwards"] += 1
        starts = next_positions.tolist()
        for question, start in zip(batch, starts):
            question.start_position, question.read_len = start, len(question.prompt.ids)
            question.admitted, self.admissions = self.admissions, self.admissions + 1
            self.resident.append(question)
        # First tokens of the CoT branches that need one (all, or the unfinished ones after a
        # preemption); a question in its select phase extends its select branches instead.
        rows = [(i, b) for i, q in enumerate(batch) if q.phase == "cot" for b in q.branches if b.state == "new"]
        if rows:
            self._first_tokens(first_logits[[i for i, _ in rows]], [b for _, b in rows], self.params)

    def _first_tokens(self, logits: torch.Tensor, branches: list[_Branch], params: SamplingParams) -> None:
        """Draw the first token of each branch from logits [B, V]; stop-token or budget-1
        branches end here, the rest become ready for a slot."""
        device = self.device
        temps = torch.tensor([b.temperature for b in branches], dtype=torch.float32, device=device)
        keys = torch.tensor([b.key for b in branches], dtype=torch.long, device=device)
        steps = torch.zeros(len(branches), dtype=torch.long, device=device)
        token, logprob = sample_tokens(logits, temps, params, keys, steps,
                                       any_sampled=any(b.temperature > 0 for b in branches))
        stops = set(self.s.stop_ids)
        for branch, t, lp in zip(branches, token.tolist(), logprob.tolist()):
            if branch.limit <= 0:
                self._finish(branch, [], [])
            elif t in stops or branch.limit == 1:
                self._finish(branch, [t], [lp])
            else:
                branch.tokens, branch.logprobs, branch.state, branch.generated = [t], [lp], "ready", 1

    # ------------------------------------------------------------------------- select branches
    def _start_selects(self) -> None:
        """Extend forwards for select branches that wait for one, as slots and blocks allow."""
        pending = [b for q in sorted(self.resident, key=lambda q: q.admitted) if q.phase == "select"
                   for b in q.selects if b.state == "new"]
        room = self._free_slots() - sum(1 for q in self.resident for b in q.active if b.state == "ready")
        batch, reserved = [], 0
        for branch in pending[:max(room, 0)]:
            need = self._blocks_for(len(branch.prompt_tokens) + self.ahead)
            if not self._room(reserved + need):
                break
            batch.append(branch)
            reserved += need
        # Chunks whose [rows, S, P + S] attention masks stay below _EXTEND_MASK_ELEMENTS.
        chunk: list[_Branch] = []
        for branch in batch:
            grown = chunk + [branch]
            new = max(len(b.prompt_tokens) for b in grown)
            prefix = max(len(b.question.prefix_blocks) for b in grown) * self.block
            if chunk and len(grown) * new * (prefix + new) > _EXTEND_MASK_ELEMENTS:
                self._extend(chunk)
                grown = [branch]
            chunk = grown
        if chunk:
            self._extend(chunk)
        self._start_ready()

    def _extend(self, branches: list[_Branch]) -> None:
        """Prefill the select tokens of ``branches`` after their shared prefix part."""
        s, device = self.s, self.device
        width = max(len(b.prompt_tokens) for b in branches)
        for branch in branches:
            self._grow(branch, len(branch.prompt_tokens) + self.ahead)
        self._ensure_slot_width(max(len(b.blocks) for b in branches))
        input_ids = torch.full((len(branches), width), s.pad_id, dtype=torch.long)
        for r, branch in enumerate(branches):
            input_ids[r, :len(branch.prompt_tokens)] = torch.tensor(branch.prompt_tokens)
        # A select token at prompt index C + j sits at C + j + rope delta.
        starts = torch.tensor([b.question.shared + b.question.start_position - len(b.question.prompt.ids)
                               for b in branches], device=device)
        positions = starts[:, None] + torch.arange(width, device=device)                  # [B, S]
        blocks, offsets = self._destinations([(b.blocks, 0, len(b.prompt_tokens)) for b in branches], width)
        prefix_width = max(len(b.question.prefix_blocks) for b in branches)
        tables = torch.tensor([q.prefix_blocks + [SCRATCH_BLOCK] * (prefix_width - len(q.prefix_blocks))
                               for q in (b.question for b in branches)], device=device)   # [B, MPB]
        new_lens = torch.tensor([len(b.prompt_tokens) for b in branches], device=device)
        self.cache.begin_extend(blocks, offsets, tables, torch.tensor([b.question.shared for b in branches],
                                                                        device=device), new_lens)
        hidden = s._forward(self.cache, positions, input_ids=input_ids.to(device))      # [B, S, D]
        self.cache.end_forward()
        last = hidden[torch.arange(len(branches), device=device), new_lens - 1]          # [B, D]
        logits = s.lm_head(last).float()
        del hidden, last
        self.stats["prefill_tokens"] += int(new_lens.sum())
        for branch in branches:
            branch.kv_len = len(branch.prompt_tokens)
            branch.question.read_len = branch.question.shared
        self._first_tokens(logits, branches, self.select_params)

    # ------------------------------------------------------------------------- memory
    def _reserve(self) -> None:
        """Blocks for the next interval of every running branch; preempt if the pool is short."""
        running = [b for q in self.resident for b in q.active if b.state == "running"]
        while True:
            need = sum(max(0, self._blocks_for(b.kv_len + self.ahead) - len(b.blocks)) for b in running)
            if need <= len(self.free_blocks):
                break
            victims = sorted((q for q in self.resident if q.prefix_blocks), key=lambda q: q.admitted)
            if len(victims) <= 1:
                raise RuntimeError(
                    f"shared-prefix sampler: the KV pool ({self.num_blocks - 1} blocks of {self.block} tokens) "
                    f"cannot hold one question's branches; raise kv_budget_tokens")
            self._preempt(victims[-1])
            running = [b for q in self.resident for b in q.active if b.state == "running"]
        for branch in running:
            self._grow(branch, branch.kv_len + self.ahead)
        if running:
            self._ensure_slot_width(max(len(b.blocks) for b in running))

    def _preempt(self, question: _Question) -> None:
        """Free the question's blocks and send it back to the front of the queue; its unfinished
        branches start over (with the same draws) when it is admitted again."""
        for branch in question.active:
            if branch.state != "done":
                if branch.out_row is not None:
                    self.free_out_rows.append(branch.out_row)
                self._give_blocks(branch.blocks)
                branch.reset()
        self._give_blocks(question.prefix_blocks)
        question.prefix_blocks, question.admitted = [], -1
        self.resident.remove(question)
        self.waiting.appendleft(question.prompt.index)
        self.stats["preemptions"] += 1

    def _ensure_slot_width(self, blocks: int) -> None:
        if blocks > self.cache.slot_tables.shape[1]:
            self._widen("slot_tables", max(blocks, 2 * self.cache.slot_tables.shape[1]))

    def _ensure_prefix_width(self, blocks: int) -> None:
        if blocks > self.cache.prefix_tables.shape[1]:
            self._widen("prefix_tables", max(blocks, 2 * self.cache.prefix_tables.shape[1]))

    def _widen(self, name: str, columns: int) -> None:
        """A wider block table (new buffer: the captured graphs read the old one, drop them)."""
        old = getattr(self.cache, name)
        new = old.new_zeros(old.shape[0], columns)
        new[:, :old.shape[1]] = old
        setattr(self.cache, name, new)
        self.cache.set_view()
        self.runner.reset()

    def _destinations(self, rows: list[tuple[list[int], int, int]], width: int):
        """(blocks, offsets) [len(rows) * width] where token j of row i goes: row = (block
        list, first position, tokens); positions past a row's tokens go to the scratch block."""
        blocks, offsets = [], []
        for table, first, count in rows:
            for j in range(width):
                position = first + j
                blocks.append(table[position // self.block] if j < count else SCRATCH_BLOCK)
                offsets.append(position % self.block)
        device = self.device
        return torch.tensor(blocks, device=device), torch.tensor(offsets, device=device)

    # ------------------------------------------------------------------------- layout
    def _upload(self) -> None:
        """Pack the running branches into slots [0, n) by question and write the device state."""
        previous = {id(b): b.slot for b in self.layout}
        layout = [b for q in sorted(self.resident, key=lambda q: q.admitted) for b in q.active
                  if b.state == "running"]
        questions = list({id(b.question): b.question for b in layout}.values())   # in layout order
        row_of = {id(q): r for r, q in enumerate(questions)}
        cache, device, size = self.cache, self.device, self.num_slots
        msb, mpb = cache.slot_tables.shape[1], cache.prefix_tables.shape[1]
        empty = len(layout) == 0
        tables, lens, gen, limits, temps, keys, base, is_select, out_rows, source, first = (
            [], [], [], [], [], [], [], [], [], [], [])
        question_slots = [[-1] * self.width for _ in range(size)]
        column = [0] * len(questions)
        for slot, branch in enumerate(layout):
            q = branch.question
            r = row_of[id(q)]
            question_slots[r][column[r]] = slot
            column[r] += 1
            tables.append(branch.blocks + [SCRATCH_BLOCK] * (msb - len(branch.blocks)))
            lens.append(branch.kv_len)
            gen.append(branch.generated)
            limits.append(branch.limit)
            temps.append(branch.temperature)
            keys.append(branch.key)
            # A CoT branch's KV token 0 follows the prompt; a select branch's follows its shared part.
            base.append(q.shared + q.start_position - len(q.prompt.ids) if branch.is_select else q.start_position)
            is_select.append(branch.is_select)
            out_rows.append(branch.out_row)
            old = previous.get(id(branch))
            if old is None:
                branch.start_step = self.stats["decode_steps"]
            source.append(size if old is None else old)
            first.append(branch.tokens[-1] if old is None else 0)
            branch.slot = slot
        pad = size - len(layout)
        tables += [[SCRATCH_BLOCK] * msb] * pad
        prefix_tables = [q.prefix_blocks + [SCRATCH_BLOCK] * (mpb - len(q.prefix_blocks)) for q in questions]
        prefix_tables += [[SCRATCH_BLOCK] * mpb] * (size - len(questions))
        prefix_lens = [q.read_len for q in questions] + [0] * (size - len(questions))

        def put(buffer, values, fill):
            buffer.copy_(torch.tensor(values + [fill] * (buffer.shape[0] - len(values)), dtype=buffer.dtype))

        # The input token of a slot: the last draw of a branch that stays (a device gather, no
        # host sync) or the first token of a branch that joins (from the host).
        source_t = torch.tensor(source + [size] * pad, device=device)
        carried = torch.cat([self.token_in, self.token_in.new_zeros(1)])[source_t]
        joined = torch.tensor(first + [0] * pad, device=device)
        self.token_in.copy_(torch.where(source_t < size, carried, joined))
        cache.slot_tables.copy_(torch.tensor(tables, dtype=torch.int32))
        cache.question_slots.copy_(torch.tensor(question_slots, dtype=torch.int32))
        cache.prefix_tables.copy_(torch.tensor(prefix_tables, dtype=torch.int32))
        put(cache.prefix_lens, prefix_lens, 0)
        put(cache.slot_lens, lens, 0)
        put(cache.slot_live, [1] * len(layout), 0)
        put(self.gen, gen, 0)
        put(self.limits, limits, 1)
        put(self.temps, temps, 0.0)
        put(self.keys, keys, 0)
        put(self.base, base, 0)
        put(self.is_select, is_select, False)
        put(self.out_rows, out_rows, size)
        self.finished.zero_()
        self.layout = layout
        self.any_sampled = any(b.temperature > 0 for b in layout)
        self.any_select_sampled = any(b.temperature > 0 and b.is_select for b in layout)
        if self.use_graphs or empty:
            cache.set_view()                                    # fixed shapes for the graphs
        else:
            cache.set_view(rows=len(questions), prefix_blocks=max(len(q.prefix_blocks) for q in questions),
                           slot_blocks=max(len(b.blocks) for b in layout))


class _Engine:
    """Device state that outlives one call: the paged cache, the per-slot buffers, the output
    rows and the CUDA graphs that read them. The sampler keeps it, so the graphs of one call
    serve the next (a bootstrap phase samples chunk after chunk) while the sizes fit."""

    def __init__(self, sampler: SharedPrefixSampler, *, num_slots: int, width: int, block: int, out_width: int,
                 num_blocks: int, slot_blocks: int, prefix_blocks: int, use_graphs: bool):
        self.s = sampler
        text = sampler.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        dev = sampler.device
        self.sizes = dict(num_slots=num_slots, width=width, block=block, use_graphs=use_graphs)
        self.out_width = out_width
        self.cache = PagedPrefixCache(
            sampler.num_layers, num_blocks=num_blocks, block_size=block, num_kv_heads=text.num_key_value_heads,
            head_dim=head_dim, dtype=sampler.lm_head.weight.dtype, device=dev, max_slots=num_slots,
            max_rows=num_slots, max_width=width, slot_blocks=slot_blocks, prefix_blocks=prefix_blocks,
            backend=sampler.backend)
        n = num_slots
        # Per-slot decode state (slot i of the current layout); row n of the outputs is "no slot".
        self.token_in = torch.zeros(n, dtype=torch.long, device=dev)     # last drawn token: next input
        self.gen = torch.zeros(n, dtype=torch.long, device=dev)          # tokens the branch generated
        self.limits = torch.ones(n, dtype=torch.long, device=dev)
        self.temps = torch.zeros(n, dtype=torch.float32, device=dev)
        self.keys = torch.zeros(n, dtype=torch.long, device=dev)
        self.base = torch.zeros(n, dtype=torch.long, device=dev)         # position of the branch's KV token 0
        self.is_select = torch.zeros(n, dtype=torch.bool, device=dev)
        self.out_rows = torch.full((n,), n, dtype=torch.long, device=dev)
        self.finished = torch.zeros(n, dtype=torch.bool, device=dev)
        self.out_tokens = torch.zeros(n + 1, out_width, dtype=torch.long, device=dev)
        self.out_logprobs = torch.zeros(n + 1, out_width, dtype=torch.float32, device=dev)
        self.stop_ids = torch.tensor(sampler.stop_ids, dtype=torch.long, device=dev)
        # A failed capture turns graphs off for the sampler too (later engines decode eagerly).
        self.runner = _GraphRunner(self.decode_forward, use_graphs,
                                   on_failure=lambda: setattr(sampler, "cuda_graphs", False))

    def fits(self, *, num_slots: int, width: int, block: int, out_width: int, num_blocks: int, slot_blocks: int,
             prefix_blocks: int, use_graphs: bool) -> bool:
        """Whether a call with these sizes can run on this engine (tables widen on demand)."""
        return (self.sizes == dict(num_slots=num_slots, width=width, block=block, use_graphs=use_graphs)
                and self.out_width >= out_width and self.cache.num_blocks >= num_blocks
                and self.stop_ids.tolist() == self.s.stop_ids)

    def _num_splits(self, n: int) -> int | None:
        """Key-length splits for the Triton kernel at n slots. The question table has a row per
        slot, most of them empty, so the kernel's own rule (which counts all rows) would not
        split; the rows that do work are about n / width."""
        if self.s.device.type != "cuda":
            return None
        from r3v_fast.kernels.cascade_attention import auto_num_splits

        cache = self.cache
        rows = -(-n // self.sizes["width"])
        keys = max(cache.prefix_tables.shape[1], cache.slot_tables.shape[1]) * cache.block_size
        return auto_num_splits(self.s.device, rows * cache.layers[0].key_pool.shape[1], keys)

    def decode_forward(self, n: int) -> torch.Tensor:
        """One decode forward of slots [0, n) -> logits [n, V] float32. Device work only on
        fixed buffers (graph-capturable)."""
        cache = self.cache
        cache.num_splits = self._num_splits(n)
        positions = self.base[:n] + cache.slot_lens[:n]                           # [n]
        cache.begin_decode(n)
        hidden = self.s._forward(cache, positions[:, None], input_ids=self.token_in[:n, None])  # [n, 1, D]
        cache.end_decode()
        return self.s.lm_head(hidden[:, -1]).float()


class _GraphRunner:
    """Runs decode forwards of the first n slots, eagerly or replayed from CUDA graphs.

    With graphs, n is rounded up to a bucket (powers of two from 8, and the slot count); per
    bucket the first step runs eagerly (it compiles the Triton kernels and warms cuBLAS outside
    the capture), the second captures the forward and every later step is one ``replay``. The
    logits of a replayed step live in the graph's static output until its next replay. If a
    capture fails, decoding goes on eagerly.
    """

    def __init__(self, forward, use_graph: bool, on_failure=None):
        self.forward, self.use_graph, self.on_failure = forward, use_graph, on_failure
        self.pool = None
        self.reset()

    def reset(self) -> None:
        self.graphs: dict[int, tuple] = {}
        self.warm: set[int] = set()

    def bucket(self, live: int, slots: int) -> int:
        if not self.use_graph:
            return live
        size = _MIN_BUCKET
        while size < live:
            size *= 2
        return min(size, slots)

    def step(self, n: int) -> torch.Tensor:
        if not self.use_graph or n not in self.warm:
            self.warm.add(n)
            return self.forward(n)
        if n not in self.graphs:
            self._capture(n)
            if not self.use_graph:
                return self.forward(n)
        graph, logits = self.graphs[n]
        graph.replay()
        return logits

    def _capture(self, n: int) -> None:
        import warnings

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # Capture records without executing: the caller replays it to run this step.
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.forward(n)
        except RuntimeError as err:   # keep sampling, just without graphs
            warnings.warn(f"shared-prefix sampler: CUDA graph capture failed ({err}); decoding eagerly",
                          RuntimeWarning, stacklevel=3)
            self.use_graph = False
            if self.on_failure is not None:
                self.on_failure()
            return
        self.graphs[n] = (graph, logits)
