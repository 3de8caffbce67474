"""The R³V loop: bootstrap → build task sets → train → evaluate, for T iterations.

Each iteration t (docs/architecture.md, "The algorithm"):
1. sample K solutions per training question with the previous iteration's model (the base
   model at t = 1) and add them to the pool (sharded, resumable);
2. build SFT / refine / select examples from the whole pool (plus the warm-up data);
3. train from the base model (``--init base``, the public default) or from the previous
   checkpoint, and save the merged checkpoint (safetensors) to ``checkpoints/iter_<t>``;
4. evaluate that checkpoint on the held-out split: Pass@1, maj@K, oracle@K, select@K.

The run directory (r3v_fast.engine.rundir) holds everything needed to resume. A phase is
marked finished only after its outputs are on disk, so a killed run resumes at the phase in
flight; inside it, sampling resumes at the first missing pool shard and training at the last
saved training state. Every part of the engine gets its own option group of the run
configuration (``cfg.sampling``, ``cfg.tasks``, ``cfg.train``, ...).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from r3v_fast.config import DataOptions, RunConfig, SamplingOptions, UsageError, resolve_bf16
from r3v_fast.data import judge, prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.evaluation import is_right, score_questions, summarize
from r3v_fast.engine.examples import Example
from r3v_fast.engine.pool import Pool, Sample, chunk_ranges
from r3v_fast.engine.report import format_row, write_plot
from r3v_fast.engine.rundir import RunDir
from r3v_fast.engine.sampler import HFSampler, Request, SamplingParams
from r3v_fast.engine.tasks import build_examples
from r3v_fast.engine.trainer import Trainer, apply_lora, is_fsdp
from r3v_fast.model.loading import load_vlm, tokenizer_of

__all__ = ["RunData", "load_run_data", "chat_special_tokens", "record_check", "check_prompt_lengths",
           "make_sampler", "warmup_examples", "Run"]


@dataclass
class RunData:
    train: list[Record]
    test: list[Record]
    warmup: list[Record] = field(default_factory=list)


def chat_special_tokens(processor) -> list[str]:
    """The strings a processor treats as chat or vision markup rather than text: the tokenizer's
    special tokens, its added tokens marked special (Qwen2-VL's ``<|image_pad|>``,
    ``<|vision_start|>``, ...) and the processor's image / video placeholders (LLaVA's
    ``<image>``). One of them inside a question would be expanded or parsed as markup."""
    tokenizer = tokenizer_of(processor)
    tokens = set(getattr(tokenizer, "all_special_tokens", []))
    tokens |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
               if getattr(t, "special", False)}
    tokens |= {getattr(processor, name, None) for name in ("image_token", "video_token")}
    return sorted(t for t in tokens if isinstance(t, str) and t.strip())


def record_check(special_tokens, *, warmup: bool):
    """The run's own rule for a loaded record (a DataError skips it, counted and named):

    - no chat special token in any text that enters a prompt or a target (question, choices,
      unit, answer, worked solution). Such a record is rejected, not escaped: an escaped token
      would change the question the model sees, and the processor would still expand a vision
      placeholder found in it, so sampling would fail on every resume;
    - a shapes-math warm-up record carries ``meta`` (its scene and worked solution): without
      it the record is not a shapes-math warm-up item at all."""
    def check(record: Record, where: str) -> None:
        from r3v_fast.data.records import DataError

        rationale = (record.meta or {}).get("rationale")
        fields = [("question", record.question), ("answer", record.answer), ("unit", record.unit),
                  *(("choice", c) for c in record.choices or ()),
                  ("worked solution", rationale if isinstance(rationale, str) else None)]
        for name, text in fields:
            for token in special_tokens:
                if text and token in text:
                    raise DataError(f"{where}: the {name} contains the chat special token {token!r}",
                                    "chat special token")
        if warmup and record.dataset == "shapes-math" and not record.meta:
            raise DataError(f"{where}: shapes-math warm-up record without meta (no scene, no worked "
                            "solution)", "warm-up without meta")
    return check


def load_run_data(options: DataOptions, *, log=print, special_tokens=()) -> RunData:
    """Training, test and warm-up questions; bad records are skipped and counted (UsageError
    when a file cannot be read at all, or no training record is left), the first few named with
    their file:line. ``special_tokens`` (:func:`chat_special_tokens` of the run's processor):
    a record with one in its text is skipped. Without ``--data`` the embedded shapes-math split
    is used, generated on first use."""
    from r3v_fast.data.loaders import load_files
    from r3v_fast.data.records import DataError

    def load(paths, what, image_root=options.image_root):
        try:
            records, reports = load_files(paths, fmt=options.data_format, image_root=image_root,
                                          strict=False, check_images=True, dataset=options.dataset,
                                          check=record_check(special_tokens, warmup=what == "warmup"))
        except (DataError, OSError) as err:
            raise UsageError(f"cannot load {what} data: {err}")
        for report in reports:
            if report.skipped or len(reports) > 1:
                log(f"{what} data: {report.summary()}")
        return records

    warmup_root = options.warmup_image_root or options.image_root
    if not options.data:
        from r3v_fast.data.shapes import default_dataset

        root = default_dataset(n_train=options.shapes_train, n_test=options.shapes_test)
        train, test, warmup = (load(root / f"{name}.jsonl", name, None) for name in ("train", "test", "warmup"))
        if options.test_data:
            test = load(options.test_data, "test")
        if options.warmup_data:
            warmup = load(options.warmup_data, "warmup", warmup_root)
    else:
        train = load(options.data, "train")
        test = load(options.test_data, "test") if options.test_data else []
        warmup = load(options.warmup_data, "warmup", warmup_root) if options.warmup_data else []
    if options.max_train_questions is not None:
        train = train[: options.max_train_questions]
    if options.max_test_questions is not None:
        test = test[: options.max_test_questions]
    if not train:
        raise UsageError("the training data yields zero usable records")
    return RunData(train=train, test=test, warmup=warmup)


def check_prompt_lengths(cfg: RunConfig, data: RunData, model_dir: Path, processor=None) -> None:
    """UsageError before any work when a training question's prompt leaves no room under
    ``--max-length``: every example of that question would be dropped. The error names the
    question with the longest prompt and the length it needs (prompt + one target token + end
    of turn).

    Only the processor is needed (``processor``, or loaded from ``model_dir``), not the model.
    Each question's shortest training prompt is its CoT prompt (refine and select prompts add to
    it); a warm-up record's is the prompt it is trained with. The length counts the image tokens the processor expands the image into,
    computed from the image header (r3v_fast.model.image_tokens); a byte bound skips the
    tokenizer for prompts that clearly fit. ``--max-tokens`` is at least ``--max-length``
    (RunConfig.validate), so a micro-batch holds any example that passes here."""
    from r3v_fast.data.records import DataError
    from r3v_fast.engine.examples import ExampleLengths, who_of
    from r3v_fast.engine.stream import _image_tokens

    if processor is None:
        processor = load_processor(model_dir, cfg.model.trust_remote_code)
    render = prompts.renderer(processor)
    lengths = ExampleLengths(processor)
    limit = cfg.train.max_length
    examples = [Example(task="sft", group=r.id, image=r.image, prompt=render(prompts.cot_messages(r)),
                        target="", question_id=r.id) for r in data.train]
    examples += [replace(warmup_example(r, render), target="") for r in data.warmup]
    image_tokens: dict[str, int] = {}
    longest, longest_ex, longest_image = 0, None, 0
    for index, ex in enumerate(examples):
        n_image = 0
        if ex.image:
            if ex.image not in image_tokens:
                try:
                    image_tokens[ex.image] = _image_tokens(processor, ex, index)
                except DataError:
                    image_tokens[ex.image] = -1  # skipped and counted when its examples are loaded
            n_image = image_tokens[ex.image]
            if n_image < 0:
                continue
        # The bound of an empty target counts the end-of-turn token and a word-start byte, so it
        # bounds the shortest example: prompt + one target token + end of turn.
        if lengths.bound(ex, n_image) <= limit:
            continue
        shortest = lengths.exact(ex, n_image, who=who_of(ex, index)) + 1
        if shortest > max(limit, longest):
            longest, longest_ex, longest_image = shortest, ex, n_image
    if longest_ex is not None:
        raise UsageError(f"--max-length {limit} leaves no room for a solution: question {longest_ex.group}'s "
                         f"{'warm-up' if longest_ex.task == 'warmup' else 'CoT'} prompt is {longest - 2} tokens "
                         f"({longest_image} of them image tokens), so every example of it would be dropped; "
                         f"raise --max-length to at least {longest} (with room for a solution: about "
                         f"{longest - 2 + cfg.sampling.max_new_tokens})")


# ------------------------------------------------------------------------------ helpers
def make_sampler(options: SamplingOptions, model, processor, *, show_progress: bool = True):
    """The sampler ``--sampler`` names, built from the sampling options."""
    if options.sampler == "shared":
        from r3v_fast.engine.shared_sampler import SharedPrefixSampler

        return SharedPrefixSampler(model, processor, batch_size=options.sample_batch_size,
                                   show_progress=show_progress, max_slots=options.sample_slots,
                                   kv_block_size=options.kv_block_size, kv_budget_tokens=options.kv_budget_tokens,
                                   max_prefill_tokens=options.max_prefill_tokens, sync_every=options.sync_every)
    if options.sampler == "shared-grouped":
        from r3v_fast.engine.grouped_sampler import GroupedPrefixSampler

        return GroupedPrefixSampler(model, processor, batch_size=options.sample_batch_size,
                                    show_progress=show_progress, sync_every=options.sync_every)
    if options.sampler == "hf":
        return HFSampler(model, processor, batch_size=options.sample_batch_size, show_progress=show_progress)
    raise UsageError(f"unknown sampler {options.sampler!r} (available: shared, shared-grouped, hf)")


def load_processor(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)


def warmup_example(record: Record, render) -> Example:
    """What a warm-up record teaches, decided per record:

    - with a worked solution (``meta["rationale"]``: the distilled CoT of an MM-Self-Improve
      ``*_sft_gpt.json`` file, the template solution of a shapes-math warm-up item), the CoT
      prompt with that rationale as target;
    - without one (direct-answer QA, e.g. ``sft_qa.json``), the direct-answer prompt with the
      answer line alone as target. Under the CoT prompt an answer-only target would teach the
      model to skip the reasoning it is asked for.
    """
    rationale = (record.meta or {}).get("rationale")
    if rationale:
        messages, target = prompts.cot_messages(record), rationale
    else:
        messages, target = prompts.direct_messages(record), prompts.answer_line(record.answer)
    return Example(task="warmup", group=record.id, image=record.image, prompt=render(messages),
                   target=target, question_id=record.id)


def warmup_examples(records: list[Record], render) -> list[Example]:
    return [warmup_example(r, render) for r in records]


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """The phase's peak memory: GPU memory allocated by torch since the phase began on CUDA;
    else the process's peak resident host memory so far (it never goes down)."""
    if torch.device(device).type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "memory_kind": "cuda"}
    import resource

    return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "memory_kind": "host_rss"}


def count_tokens(processor, texts) -> int:
    """Tokens in generated texts (each plus its stop token): the sampling work of a phase."""
    texts = [t for t in texts if t]
    if not texts:
        return 0
    ids = tokenizer_of(processor)(texts, add_special_tokens=False)["input_ids"]
    return sum(len(i) + 1 for i in ids)


def tracker_values(record: dict) -> dict[str, float]:
    """The numbers of a metrics record as tracker scalars, named "<phase>/<key>"."""
    prefix = record["phase"]
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iteration", "step")}


# ------------------------------------------------------------------------------ the run
class Run:
    def __init__(self, cfg: RunConfig, run_dir: RunDir, model_dir: Path, data: RunData, accelerator,
                 log=print):
        self.cfg = cfg
        self.dir = run_dir
        self.model_dir = model_dir
        self.data = data
        self.acc = accelerator
        self.log = log if accelerator.is_main_process else (lambda *a, **k: None)
        self.pool = Pool(run_dir.pool_dir)
        self.phase = "run start"       # the phase in flight, for error messages ("iteration 1 train")
        if accelerator.is_main_process:
            run_dir.recover_metrics(log=self.log)
        self.dtype = torch.bfloat16 if resolve_bf16(cfg.model.bf16) else torch.float32

    # progress + metrics ---------------------------------------------------------------
    def done(self, key: str) -> bool:
        return self.dir.done(key)

    def mark(self, key: str, metrics: dict | None = None) -> None:
        """Record a finished phase (main process only), appending its metrics line first and
        sending its numbers to the trackers (--report-to) at step = iteration."""
        if self.acc.is_main_process:
            self.dir.mark(key, metrics)
            if metrics is not None:
                self.acc.log(tracker_values(metrics), step=metrics["iteration"])
        self.acc.wait_for_everyone()

    def metrics(self) -> list[dict]:
        return self.dir.metrics()

    # models -----------------------------------------------------------------------------
    def load(self, path: Path):
        model, processor = load_vlm(path, dtype=self.dtype, device=str(self.acc.device),
                                    trust_remote_code=self.cfg.model.trust_remote_code)
        model.eval()
        return model, processor

    def save_checkpoint(self, model, processor, iteration: int) -> None:
        if self.acc.is_main_process:
            self.dir.save_checkpoint(model, processor, iteration)
        self.acc.wait_for_everyone()

    def save_sharded_checkpoint(self, trainer: Trainer, init: Path, processor, iteration: int) -> None:
        """FSDP: the trained weights are gathered tensor by tensor on every rank, kept by the main
        process only, which loads them into a fresh unsharded copy of the model (on the CPU,
        LoRA adapters included), merges and writes it as the other paths do."""
        state = trainer.full_state_dict()
        trainer.model = None
        if self.acc.is_main_process:
            model, _ = load_vlm(init, dtype=torch.float32 if self.cfg.train.lora_r <= 0 else self.dtype,
                                device="cpu", trust_remote_code=self.cfg.model.trust_remote_code)
            model = apply_lora(model, self.cfg.train, seed=self.cfg.run.seed)
            model.load_state_dict(state)
            del state
            self.dir.save_checkpoint(model, processor, iteration)
        self.acc.wait_for_everyone()

    def sampler(self, model, processor):
        return make_sampler(self.cfg.sampling, model, processor, show_progress=self.cfg.run.progress)

    # phases -----------------------------------------------------------------------------
    def bootstrap(self, iteration: int, model, processor) -> dict:
        """Sample K solutions per training question into the pool; chunks are dealt to ranks."""
        cfg, t0 = self.cfg, time.time()
        reset_peak_memory(self.acc.device)
        generated = 0
        render = prompts.renderer(processor)
        sampler = self.sampler(model, processor)
        params = SamplingParams.from_options(cfg.sampling, seed=cfg.run.seed * 1000 + iteration)
        chunks = chunk_ranges(len(self.data.train), cfg.loop.chunk_size)
        todo = [c for c in self.unusable_chunks(iteration)
                if c % self.acc.num_processes == self.acc.process_index]
        if len(todo) < len(chunks) // self.acc.num_processes:
            self.log(f"iteration {iteration}: resuming bootstrap, {len(todo)} chunks left on this rank")
        for c in todo:
            records = [self.data.train[i] for i in chunks[c]]
            requests = [Request(render(prompts.cot_messages(r)), r.image, key=r.id) for r in records]
            # A question's samples depend only on (seed, iteration, question id, branch): not on
            # its chunk, its batch or the rank that samples it.
            outputs = sampler.sample(requests, params,
                                     desc=f"iter {iteration} bootstrap {c + 1}/{len(chunks)}")
            samples = [Sample(question_id=r.id, iteration=iteration, index=j, text=text,
                              answer=judge.extract_answer(r.dataset, text),
                              correct=is_right(r, text))
                       for r, texts in zip(records, outputs) for j, text in enumerate(texts)]
            self.pool.write_shard(iteration, c, samples, question_ids=[r.id for r in records])
            generated += count_tokens(processor, [text for texts in outputs for text in texts])
        self.acc.wait_for_everyone()
        chunks_per_rank, tokens_per_rank = [len(todo)], [generated]
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            chunks_per_rank, tokens_per_rank = gather_object(chunks_per_rank), gather_object(tokens_per_rank)
        return {"iteration": iteration, "phase": "bootstrap", "pool_accuracy": 100 * self.pool.accuracy(iteration),
                "samples": cfg.sampling.k * len(self.data.train), "chunks_per_rank": chunks_per_rank,
                "generated_tokens": sum(tokens_per_rank), "seconds": time.time() - t0,
                **peak_memory(self.acc.device)}

    def unusable_chunks(self, iteration: int, *, report: bool = True) -> list[int]:
        """The chunks of this iteration whose pool shard is missing or damaged (emptied, cut
        short, torn, written for other questions or another K); ``report`` names each damaged
        one in the log."""
        chunks = chunk_ranges(len(self.data.train), self.cfg.loop.chunk_size)
        unusable = []
        for c, indices in enumerate(chunks):
            problem = self.pool.shard_problem(iteration, c, [self.data.train[i].id for i in indices],
                                              self.cfg.sampling.k)
            if problem is None:
                continue
            if problem != "missing" and report:
                self.log(f"iteration {iteration}: damaged pool shard, chunk {c} is sampled again: {problem}")
            unusable.append(c)
        return unusable

    def repair_pool(self, iteration: int) -> None:
        """Before training on the pool of iterations 1..t: sample again every chunk whose shard
        is damaged, with the weights its iteration sampled from (same seed, same draws)."""
        damaged = [it for it in range(1, iteration + 1) if self.done(f"bootstrap:{it}")
                   and self.unusable_chunks(it, report=False)]
        self.acc.wait_for_everyone()        # every rank has looked before any shard is rewritten
        for it in damaged:
            model, processor = self.load(self.sampling_model(it))
            self.bootstrap(it, model, processor)
            del model

    def build(self, iteration: int, processor):
        render = prompts.renderer(processor)
        warmup = warmup_examples(self.data.warmup, render)
        return build_examples(self.data.train, self.pool.by_question(max_iteration=iteration),
                              render, self.cfg.tasks, warmup, seed=self.cfg.run.seed)

    def sampling_model(self, iteration: int) -> Path:
        """The weights iteration t samples from: the previous iteration's checkpoint, the
        warm-up round's at t = 1 when there is one, else the base model."""
        if iteration > 1 or (iteration == 1 and self.cfg.loop.warmup_round):
            return self.dir.checkpoint(iteration - 1)
        return self.model_dir

    def step_logger(self, iteration: int):
        """Every optimizer step goes to metrics.jsonl ("train_step" records) and to the trackers,
        at a step count that runs on across iterations."""
        offset = sum(m["steps"] for m in self.metrics() if m["phase"] == "train" and m["iteration"] < iteration)

        def log_step(record: dict) -> None:
            if self.acc.is_main_process:
                entry = {"iteration": iteration, "phase": "train_step", **record}
                self.dir.append_metrics(entry)
                self.acc.log(tracker_values(entry), step=offset + record["step"])
        return log_step

    def init_model(self, iteration: int) -> Path:
        """The weights iteration t trains from: the base model (``--init base``, and always for the
        warm-up round), or the checkpoint iteration t samples from (``--init previous``)."""
        if iteration == 0 or self.cfg.loop.init == "base":
            return self.model_dir
        return self.sampling_model(iteration)

    def train(self, iteration: int, examples) -> dict:
        cfg = self.cfg
        init = self.init_model(iteration)
        # Full fine-tuning keeps fp32 master weights (bf16 autocast does the compute); LoRA
        # trains small adapters on top of weights held in the run's dtype.
        model, processor = load_vlm(init, dtype=torch.float32 if cfg.train.lora_r <= 0 else self.dtype,
                                    device=str(self.acc.device), trust_remote_code=cfg.model.trust_remote_code)
        model = apply_lora(model, cfg.train, seed=cfg.run.seed)
        trainer = Trainer(model, processor, self.acc, cfg.train, self.dir.train_state_dir,
                          log=self.log, show_progress=cfg.run.progress, seed=cfg.run.seed,
                          on_step=self.step_logger(iteration))
        summary = trainer.train(examples)
        if is_fsdp(self.acc):
            self.save_sharded_checkpoint(trainer, init, processor, iteration)
        else:
            self.save_checkpoint(trainer.model, processor, iteration)
        history = summary.pop("history")
        last = history[-1] if history else {}
        return {"iteration": iteration, "phase": "train", **summary,
                **{k: v for k, v in last.items() if k.startswith("L_") or k == "loss"}}

    def evaluate(self, iteration: int, model, processor) -> dict:
        from accelerate.utils import gather_object

        cfg, t0 = self.cfg, time.time()
        reset_peak_memory(self.acc.device)
        ks = cfg.eval.k_list()
        # Questions are dealt to ranks round-robin; the rows go back into question order below.
        order = list(range(len(self.data.test)))[self.acc.process_index::self.acc.num_processes]
        mine = [self.data.test[i] for i in order]
        eval_tokens = cfg.eval.eval_max_new_tokens or cfg.sampling.max_new_tokens
        params = SamplingParams.from_options(cfg.sampling, k=max(ks), max_new_tokens=eval_tokens,
                                             seed=cfg.run.seed * 1000 + 500 + iteration)
        rows = score_questions(mine, self.sampler(model, processor), prompts.renderer(processor),
                               ks=ks, params=params,
                               select_max_new_tokens=cfg.eval.select_max_new_tokens or eval_tokens)
        if self.acc.num_processes > 1:
            ranked = sorted(gather_object(list(zip(order, rows))), key=lambda pair: pair[0])
            rows = [row for _, row in ranked]
        if self.acc.is_main_process:
            self.dir.write_eval_rows(iteration, rows)
        generated = count_tokens(processor, [t for r in rows for t in (r["greedy"], *r["candidates"],
                                                                       *(s["text"] for s in r["select"].values()))])
        return {"iteration": iteration, "phase": "eval", **summarize(rows, ks), "generated_tokens": generated,
                "seconds": time.time() - t0, **peak_memory(self.acc.device)}

    # the loop ---------------------------------------------------------------------------
    def train_phase(self, iteration: int) -> None:
        """Build the mix (the warm-up data alone in the warm-up round), train, save, mark."""
        cfg, t0 = self.cfg, time.time()
        processor = load_processor(self.model_dir, cfg.model.trust_remote_code)
        if iteration == 0:
            examples = warmup_examples(self.data.warmup, prompts.renderer(processor))
            counts = Counter(e.task for e in examples)
        else:
            examples, counts = self.build(iteration, processor)
        self.log(f"iteration {iteration}: {len(examples)} examples {dict(counts)}")
        if not examples:
            raise UsageError(f"iteration {iteration}: no training example could be built "
                             "(no correct sample and no warm-up data)")
        build_seconds = time.time() - t0
        reset_peak_memory(self.acc.device)
        summary = self.train(iteration, examples)
        summary.update(build_seconds=build_seconds, **peak_memory(self.acc.device))
        summary["counts"] = {"sft": counts.get("sft", 0), "refine": counts.get("refine", 0),
                             "select": counts.get("select", 0), "warmup": counts.get("warmup", 0)}
        self.mark(f"train:{iteration}", summary)
        self.drop_train_state()

    def drop_train_state(self) -> None:
        """Remove the training state of a phase marked done. The mark comes first: a kill between
        the two leaves a finished phase and a stale state, which the next resume removes here
        (a kill before the mark resumes training from the saved step)."""
        if self.acc.is_main_process:
            self.dir.clear_train_state()
        self.acc.wait_for_everyone()

    def eval_phase(self, iteration: int, model_path: Path, t_start: float | None = None) -> None:
        if self.done(f"eval:{iteration}"):
            return
        self.phase = f"iteration {iteration} eval"
        if not self.data.test:
            self.log(f"iteration {iteration}: no test data (--test-data): not evaluated")
            return
        model, processor = self.load(model_path)
        result = self.evaluate(iteration, model, processor)
        if t_start is not None:
            result["iteration_seconds"] = time.time() - t_start
        self.mark(f"eval:{iteration}", result)
        self.log(format_row(result))

    def run(self) -> list[dict]:
        """Iteration 0 is the model iteration 1 samples from: the base model, or with
        ``--warmup-round`` the model trained on the warm-up data alone (the base model is then
        evaluated as iteration -1)."""
        cfg = self.cfg
        if cfg.loop.warmup_round and not self.data.warmup:
            raise UsageError("--warmup-round needs warm-up data (--warmup-data)")
        if cfg.loop.eval_base:
            self.eval_phase(-1 if cfg.loop.warmup_round else 0, self.model_dir)
        if cfg.loop.warmup_round:
            t_start = time.time()
            if not self.done("train:0"):
                self.phase = "iteration 0 train"
                self.train_phase(0)
            self.drop_train_state()
            self.eval_phase(0, self.dir.checkpoint(0), t_start)
        for t in range(1, cfg.loop.iterations + 1):
            t_start = time.time()
            if not self.done(f"bootstrap:{t}"):
                self.phase = f"iteration {t} bootstrap"
                model, processor = self.load(self.sampling_model(t))
                self.mark(f"bootstrap:{t}", self.bootstrap(t, model, processor))
                del model
            if not self.done(f"train:{t}"):
                self.phase = f"iteration {t} train"
                self.repair_pool(t)
                self.train_phase(t)
            self.drop_train_state()
            self.eval_phase(t, self.dir.checkpoint(t), t_start)
        if self.acc.is_main_process:
            write_plot(self.metrics(), self.dir.plot_path, title=self.dir.path.name)
        return self.metrics()
