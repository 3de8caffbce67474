"""The R³V loop: bootstrap → build task sets → train → evaluate, for T iterations.

Each iteration t (DESIGN.md §1):
1. sample K solutions per training question with the previous iteration's model (the base
   model at t = 1) and add them to the pool (sharded, resumable);
2. build SFT / refine / select examples from the whole pool (plus the warm-up data);
3. train from the base model (``--init base``, the public default) or from the previous
   checkpoint, and save the merged checkpoint (safetensors) to ``checkpoints/iter_<t>``;
4. evaluate that checkpoint on the held-out split: Pass@1, maj@K, oracle@K, select@K.

The run directory holds everything needed to resume::

    config.json        resolved configuration        progress.json   finished phases
    pool/              every sample (JSONL shards)   metrics.jsonl   one object per phase
    checkpoints/       iter_<t>/ merged HF model     accuracy.png    accuracy per iteration
    train_state/       the in-flight training state  eval/           per-question eval rows

A phase is marked finished in progress.json only after its outputs are on disk, so a killed
run resumes at the phase in flight; inside it, sampling resumes at the first missing pool
shard and training at the last saved training state.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r3v_fast.config import RunConfig, to_json
from r3v_fast.data import judge, prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.evaluation import is_right, score_questions, summarize
from r3v_fast.engine.examples import Example
from r3v_fast.engine.pool import Pool, Sample, atomic_write_text, chunk_ranges
from r3v_fast.engine.sampler import HFSampler, Request, SamplingParams
from r3v_fast.engine.tasks import TaskOptions, build_examples
from r3v_fast.engine.trainer import TrainOptions, Trainer, apply_lora
from r3v_fast.model.loading import load_vlm


class UsageError(Exception):
    """Bad configuration or input detected before any work starts (exit code 2)."""


@dataclass
class RunData:
    train: list[Record]
    test: list[Record]
    warmup: list[Record] = field(default_factory=list)


# ------------------------------------------------------------------------------ helpers
def make_sampler(name: str, model, processor, cfg: RunConfig):
    if name == "shared":
        from r3v_fast.engine.shared_sampler import SharedPrefixSampler

        return SharedPrefixSampler(model, processor, batch_size=cfg.sample_batch_size, show_progress=cfg.progress)
    if name == "hf":
        return HFSampler(model, processor, batch_size=cfg.sample_batch_size, show_progress=cfg.progress)
    raise UsageError(f"unknown sampler {name!r} (available: shared, hf)")


def load_processor(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)


def make_renderer(processor):
    return lambda messages: prompts.render(processor, messages)


def warmup_target(record: Record) -> str:
    """The worked solution a warm-up record teaches: its own rationale if it carries one (e.g.
    the distilled CoT of an MM-Self-Improve file, kept in meta["response"]), the shapes-math
    template CoT, or else the direct answer line."""
    worked = (record.meta or {}).get("rationale") or (record.meta or {}).get("response")
    if worked:
        return worked
    if record.dataset == "shapes-math":
        from r3v_fast.data.shapes import template_cot

        return template_cot(record)
    return prompts.answer_line(record.answer)


def warmup_examples(records: list[Record], render) -> list[Example]:
    return [Example(task="warmup", group=r.id, image=r.image, prompt=render(prompts.cot_messages(r)),
                    target=warmup_target(r), question_id=r.id) for r in records]


def train_options(cfg: RunConfig) -> TrainOptions:
    names = TrainOptions.__dataclass_fields__
    return TrainOptions(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})


def task_options(cfg: RunConfig) -> TaskOptions:
    star = cfg.method == "star"
    return TaskOptions(n_candidates=cfg.n_candidates, selects_per_question=cfg.selects_per_question,
                       include_refine=not star, include_select=not star,
                       include_warmup=cfg.include_warmup, seed=cfg.seed)


def sampling_params(cfg: RunConfig, iteration: int) -> SamplingParams:
    return SamplingParams(k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1000 + iteration)


# ------------------------------------------------------------------------------ the run
class Run:
    def __init__(self, cfg: RunConfig, run_dir: Path, model_dir: Path, data: RunData, accelerator,
                 log=print):
        self.cfg = cfg
        self.dir = run_dir
        self.model_dir = model_dir
        self.data = data
        self.acc = accelerator
        self.log = log if accelerator.is_main_process else (lambda *a, **k: None)
        self.pool = Pool(run_dir / "pool")
        self.progress_path = run_dir / "progress.json"
        self.dtype = torch.bfloat16 if self._bf16() else torch.float32

    def _bf16(self) -> bool:
        return bool(self.cfg.bf16) if self.cfg.bf16 is not None else torch.cuda.is_available()

    # progress + metrics ---------------------------------------------------------------
    def done(self, key: str) -> bool:
        if not self.progress_path.exists():
            return False
        return key in json.loads(self.progress_path.read_text())

    def mark(self, key: str, metrics: dict | None = None) -> None:
        """Record a finished phase (main process only), appending its metrics line first."""
        if self.acc.is_main_process:
            if metrics is not None:
                with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
            state = json.loads(self.progress_path.read_text()) if self.progress_path.exists() else {}
            state[key] = time.time()
            atomic_write_text(self.progress_path, json.dumps(state, indent=1))
        self.acc.wait_for_everyone()

    def metrics(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

    # models -----------------------------------------------------------------------------
    def checkpoint(self, iteration: int) -> Path:
        return self.dir / "checkpoints" / f"iter_{iteration:03d}"

    def load(self, path: Path):
        model, processor = load_vlm(path, dtype=self.dtype, device=str(self.acc.device),
                                    trust_remote_code=self.cfg.trust_remote_code)
        model.eval()
        return model, processor

    def save_checkpoint(self, model, processor, iteration: int) -> None:
        """Merge adapters (sampling uses plain weights) and save atomically as safetensors."""
        if self.acc.is_main_process:
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            target = self.checkpoint(iteration)
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        self.acc.wait_for_everyone()

    # phases -----------------------------------------------------------------------------
    def bootstrap(self, iteration: int, model, processor) -> dict:
        """Sample K solutions per training question into the pool; chunks are dealt to ranks."""
        cfg, t0 = self.cfg, time.time()
        render = make_renderer(processor)
        sampler = make_sampler(cfg.sampler, model, processor, cfg)
        params = sampling_params(cfg, iteration)
        chunks = chunk_ranges(len(self.data.train), cfg.chunk_size)
        todo = [c for c in range(len(chunks)) if c % self.acc.num_processes == self.acc.process_index
                and not self.pool.has_shard(iteration, c)]
        if len(todo) < len(chunks) // self.acc.num_processes:
            self.log(f"iteration {iteration}: resuming bootstrap, {len(todo)} chunks left on this rank")
        for c in todo:
            records = [self.data.train[i] for i in chunks[c]]
            requests = [Request(render(prompts.cot_messages(r)), r.image, key=r.id) for r in records]
            chunk_params = SamplingParams(**{**params.__dict__, "seed": params.seed * 100_003 + c})
            outputs = sampler.sample(requests, chunk_params,
                                     desc=f"iter {iteration} bootstrap {c + 1}/{len(chunks)}")
            samples = [Sample(question_id=r.id, iteration=iteration, index=j, text=text,
                              answer=judge.extract_answer(r.dataset, text),
                              correct=is_right(r, text))
                       for r, texts in zip(records, outputs) for j, text in enumerate(texts)]
            self.pool.write_shard(iteration, c, samples)
        self.acc.wait_for_everyone()
        chunks_per_rank = [len(todo)]
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            chunks_per_rank = gather_object(chunks_per_rank)
        return {"iteration": iteration, "phase": "bootstrap", "pool_accuracy": 100 * self.pool.accuracy(iteration),
                "samples": cfg.k * len(self.data.train), "chunks_per_rank": chunks_per_rank,
                "seconds": time.time() - t0}

    def build(self, iteration: int, processor):
        render = make_renderer(processor)
        warmup = warmup_examples(self.data.warmup, render)
        examples, counts = build_examples(self.data.train, self.pool.by_question(max_iteration=iteration),
                                          render, task_options(self.cfg), warmup)
        return examples, counts

    def train(self, iteration: int, examples) -> dict:
        cfg = self.cfg
        init = self.model_dir if cfg.init == "base" or iteration == 1 else self.checkpoint(iteration - 1)
        model, processor = load_vlm(init, dtype=torch.float32 if cfg.lora_r <= 0 else self.dtype,
                                    device=str(self.acc.device), trust_remote_code=cfg.trust_remote_code)
        model = apply_lora(model, train_options(cfg))
        trainer = Trainer(model, processor, self.acc, train_options(cfg), self.dir / "train_state",
                          log=self.log, show_progress=cfg.progress)
        summary = trainer.train(examples)
        self.save_checkpoint(trainer.model, processor, iteration)
        if self.acc.is_main_process:
            shutil.rmtree(self.dir / "train_state", ignore_errors=True)
        history = summary.pop("history")
        last = history[-1] if history else {}
        return {"iteration": iteration, "phase": "train", **summary,
                **{k: v for k, v in last.items() if k.startswith("L_") or k == "loss"}}

    def evaluate(self, iteration: int, model, processor) -> dict:
        from accelerate.utils import gather_object

        cfg, t0 = self.cfg, time.time()
        ks = cfg.eval_k_list()
        mine = self.data.test[self.acc.process_index::self.acc.num_processes]
        params = SamplingParams(k=max(ks), temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                seed=cfg.seed * 1000 + 500 + iteration)
        sampler = make_sampler(cfg.sampler, model, processor, cfg)
        rows = score_questions(mine, sampler, make_renderer(processor), ks=ks, params=params)
        if self.acc.num_processes > 1:
            rows = gather_object(rows)
        if self.acc.is_main_process:
            atomic_write_text(self.dir / "eval" / f"iter_{iteration:03d}.jsonl",
                              "".join(json.dumps(r) + "\n" for r in rows))
        return {"iteration": iteration, "phase": "eval", **summarize(rows, ks), "seconds": time.time() - t0}

    # the loop ---------------------------------------------------------------------------
    def run(self) -> list[dict]:
        cfg = self.cfg
        if cfg.eval_base and not self.done("eval:0"):
            model, processor = self.load(self.model_dir)
            self.mark("eval:0", self.evaluate(0, model, processor))
            self.log(format_row(self.metrics()[-1]))
        for t in range(1, cfg.iterations + 1):
            t_start = time.time()
            if not self.done(f"bootstrap:{t}"):
                model, processor = self.load(self.model_dir if t == 1 else self.checkpoint(t - 1))
                self.mark(f"bootstrap:{t}", self.bootstrap(t, model, processor))
                del model
            if not self.done(f"train:{t}"):
                processor = load_processor(self.model_dir, self.cfg.trust_remote_code)
                examples, counts = self.build(t, processor)
                self.log(f"iteration {t}: {len(examples)} examples {dict(counts)}")
                if not examples:
                    raise UsageError(f"iteration {t}: no training example could be built "
                                     "(no correct sample and no warm-up data)")
                summary = self.train(t, examples)
                summary["counts"] = {"sft": counts.get("sft", 0), "refine": counts.get("refine", 0),
                                     "select": counts.get("select", 0), "warmup": counts.get("warmup", 0)}
                self.mark(f"train:{t}", summary)
            if not self.done(f"eval:{t}"):
                model, processor = self.load(self.checkpoint(t))
                result = self.evaluate(t, model, processor)
                result["iteration_seconds"] = time.time() - t_start
                self.mark(f"eval:{t}", result)
                self.log(format_row(result))
        if self.acc.is_main_process:
            write_plot(self.metrics(), self.dir / "accuracy.png")
        return self.metrics()


# ------------------------------------------------------------------------------ reporting
def format_row(m: dict) -> str:
    keys = [k for k in m if "@" in k and (k == "pass@1" or not k.endswith("@1"))]
    return f"iteration {m['iteration']}: " + "  ".join(f"{k} {m[k]:.1f}" for k in keys)


def results_table(metrics: list[dict]) -> str:
    """The final printed table: one row per iteration (evaluation plus the example counts)."""
    evals = {m["iteration"]: m for m in metrics if m["phase"] == "eval"}
    trains = {m["iteration"]: m for m in metrics if m["phase"] == "train"}
    boots = {m["iteration"]: m for m in metrics if m["phase"] == "bootstrap"}
    if not evals:
        return "(no evaluation yet)"
    # maj@1, oracle@1 and select@1 all equal the first sample's accuracy: the table leaves them
    # out (metrics.jsonl keeps them).
    acc_keys = [k for k in next(iter(evals.values())) if "@" in k and (k == "pass@1" or not k.endswith("@1"))]
    header = ["iter", *acc_keys, "pool acc", "SFT", "REF", "SEL", "warm", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for it in sorted(evals):
        e, tr, b = evals[it], trains.get(it, {}), boots.get(it, {})
        counts = tr.get("counts", {})
        seconds = e.get("iteration_seconds", e.get("seconds", 0.0))
        cells = [str(it), *(f"{e[k]:.1f}" for k in acc_keys),
                 f"{b['pool_accuracy']:.1f}" if b else "-",
                 *(str(counts.get(t, "-")) for t in ("sft", "refine", "select", "warmup")), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(metrics: list[dict], path: Path) -> bool:
    """Accuracy per iteration as a PNG; skipped (returns False) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    evals = sorted((m for m in metrics if m["phase"] == "eval"), key=lambda m: m["iteration"])
    if not evals:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for key in [k for k in evals[0] if "@" in k and not k.startswith("oracle")]:
        ax.plot([m["iteration"] for m in evals], [m[key] for m in evals], marker="o", label=key)
    ax.set_xlabel("iteration (0 = starting model)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_xticks([m["iteration"] for m in evals])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
