"""Multi-task trainer: L = L_SFT + L_REF + L_SEL as target-token negative log-likelihood.

One optimizer step takes about ``batch_size`` examples (whole question groups, so that tree
packing can share their image + question prefix), split into micro-batches of at most
``max_tokens`` tokens by the packing step, with gradient accumulation over the micro-batches.
The loss never sees full logits: ``TargetLogprobs`` returns each example's summed target
log-probability through the fused segment op.

Loss mixes (``--loss-mix``):
- ``official`` (public R³V code): token mean over all target tokens of the step;
- ``per-task``: Σ_task w_task · (token mean over that task's target tokens of the step).
Both are exact over the whole step (all micro-batches and all ranks): the token counts are
known before the forward, summed across ranks once per step, and every micro-batch's
contribution is divided by the step's total, so gradient accumulation changes nothing.
L_SFT, L_REF and L_SEL (token means) are logged either way.

Runs as one process or under ``accelerate launch`` (DDP / FSDP): groups of a step are dealt
out to ranks, every rank runs the same number of micro-batches (a rank with fewer repeats
its last one with weight 0), and only the main process writes checkpoints.

Training state (trainable weights, optimizer, scheduler, step) is saved every
``save_every`` steps and when interrupted (Ctrl-C / SIGTERM), so ``--resume`` continues
from the last saved step with the same batch order.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from r3v_fast.config import TrainOptions
from r3v_fast.engine.examples import TASKS, Example, tokenize_examples
from r3v_fast.engine.packing import pack
from r3v_fast.engine.scoring import TargetLogprobs
from r3v_fast.model.loading import pad_id

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class TrainingDiverged(RuntimeError):
    """A non-finite loss: training stops, naming the step and the batch's questions."""


def apply_lora(model, options: TrainOptions):
    """Wrap the language model's linear layers with LoRA adapters (the vision tower stays frozen)."""
    if options.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, config)


def plan_steps(examples: Sequence[Example], batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Deterministic step plan: per epoch, shuffle question groups, then cut into steps of
    about ``batch_size`` examples (a group is never split: its examples share a prefix)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex.group].append(i)
    keys = sorted(groups)
    steps: list[list[int]] = []
    for epoch in range(epochs):
        order = keys[:]
        random.Random(f"{seed}:{epoch}").shuffle(order)
        current: list[int] = []
        for key in order:
            current.extend(groups[key])
            if len(current) >= batch_size:
                steps.append(current)
                current = []
        if current:
            steps.append(current)
    return steps


def loss_weights(tasks: Sequence[str], counts: dict[str, float], options: TrainOptions) -> torch.Tensor:
    """Per-example factor f such that loss = Σ_ex f_ex · (−Σ log p of ex's target tokens).

    counts: target tokens of the whole step (all micro-batches, all ranks) per task and "all".
    """
    if options.loss_mix == "official":
        return torch.tensor([1.0 / counts["all"]] * len(tasks))
    if options.loss_mix == "per-task":
        w = {"sft": options.weight_sft, "refine": options.weight_refine,
             "select": options.weight_select, "warmup": options.weight_warmup}
        return torch.tensor([w[t] / counts[t] for t in tasks])
    raise ValueError(f"unknown loss mix {options.loss_mix!r} (use 'official' or 'per-task')")


def lr_schedule(optimizer, name: str, warmup_steps: int, total_steps: int, **specific):
    """``transformers.get_scheduler(name)``, advanced by one step before training starts.

    transformers counts schedule steps from 0, so a warm-up starts at learning rate 0 and the
    first optimizer step does nothing. Here the n-th optimizer step (1-based) runs at the
    schedule's value at step n: a warm-up of w steps ramps 1/w, 2/w, ..., 1, and no step is
    spent at 0. ``specific`` goes to the scheduler (e.g. ``min_lr_rate`` for cosine_with_min_lr).
    """
    import warnings

    from transformers import get_scheduler

    scheduler = get_scheduler(name, optimizer, num_warmup_steps=max(1, warmup_steps),
                              num_training_steps=max(1, total_steps), scheduler_specific_kwargs=specific)
    with warnings.catch_warnings():   # "lr_scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return scheduler


@contextmanager
def interrupts_as_keyboard_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so that a kill also saves the training state."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:            # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """Trains one model on one mixed example set; owns its resumable state directory."""

    def __init__(self, model, processor, accelerator, options: TrainOptions, state_dir: Path,
                 log=print, show_progress: bool = True, seed: int = 0):
        self.model = model
        self.processor = processor
        self.accelerator = accelerator
        self.options = options
        self.seed = seed
        self.state_dir = Path(state_dir)
        self.log = log
        self.show_progress = show_progress

    # ----------------------------------------------------------------------------- state
    def _trainable_state(self, wrapper) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(wrapper).model
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def _save_state(self, wrapper, optimizer, scheduler, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            tmp = self.state_dir.with_name(self.state_dir.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            save_file(self._trainable_state(wrapper), str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / "optimizer.pt")
            (tmp / "step.json").write_text(json.dumps({"step": step}))
            if self.state_dir.exists():
                import shutil

                shutil.rmtree(self.state_dir)
            tmp.rename(self.state_dir)
        self.accelerator.wait_for_everyone()

    def _load_state(self, wrapper, optimizer, scheduler) -> int:
        if not (self.state_dir / "step.json").exists():
            return 0
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(wrapper).model
        weights = load_file(str(self.state_dir / "trainable.safetensors"))
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
        if missing:
            raise RuntimeError(f"{self.state_dir}: saved training state does not match the model "
                               f"(missing {missing[:3]}...)")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in weights:
                    p.copy_(weights[n].to(p.device, p.dtype))
        opt = torch.load(self.state_dir / "optimizer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        return json.loads((self.state_dir / "step.json").read_text())["step"]

    # ----------------------------------------------------------------------------- train
    def train(self, examples: Sequence[Example]) -> dict:
        """Train on ``examples``; returns a summary (steps, dropped examples, last losses, time)."""
        opts, acc = self.options, self.accelerator
        t0 = time.time()
        tokenized, dropped = tokenize_examples(self.processor, examples, max_length=opts.max_length)
        if dropped:
            self.log(f"dropped {sum(dropped.values())} over-long examples: {dict(dropped)}")
        if not tokenized:
            raise ValueError("no trainable example left (all dropped or none built)")
        kept = [examples[t.index] for t in tokenized]
        steps = plan_steps(kept, opts.batch_size, opts.epochs, self.seed)

        wrapper = TargetLogprobs(self.model, loss=opts.loss)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        scheduler = lr_schedule(optimizer, opts.lr_scheduler, opts.warmup_steps, len(steps))
        wrapper, optimizer = acc.prepare(wrapper, optimizer)
        start = self._load_state(wrapper, optimizer, scheduler)
        if start:
            self.log(f"resuming training at step {start}/{len(steps)}")
        wrapper.train()

        history: list[dict] = []
        bar = tqdm(total=len(steps), initial=start, desc="training", unit="step",
                   disable=not (self.show_progress and acc.is_main_process))
        step = start
        try:
            with interrupts_as_keyboard_interrupt():
                for step in range(start, len(steps)):
                    record = self._step(wrapper, optimizer, scheduler,
                                        [tokenized[i] for i in steps[step]], step)
                    history.append(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    if opts.save_every and (step + 1) % opts.save_every == 0 and step + 1 < len(steps):
                        self._save_state(wrapper, optimizer, scheduler, step + 1)
                step = len(steps)
        except KeyboardInterrupt:
            self.log(f"interrupted at step {step}: saving training state to {self.state_dir}")
            self._save_state(wrapper, optimizer, scheduler, step)
            raise
        finally:
            bar.close()
        self.model = acc.unwrap_model(wrapper).model
        return {"steps": len(steps), "examples": len(kept), "dropped": dict(dropped),
                "history": history, "seconds": time.time() - t0}

    def _step(self, wrapper, optimizer, scheduler, step_examples, step: int) -> dict:
        opts, acc = self.options, self.accelerator
        # This rank's share: whole question groups, dealt round-robin (a group's examples share
        # their image + question prefix, which tree packing computes once).
        groups = list(dict.fromkeys(ex.group for ex in step_examples))
        my_groups = set(groups[acc.process_index::acc.num_processes])
        mine = [ex for ex in step_examples if ex.group in my_groups]
        batches = pack(mine, mode=opts.packing, max_tokens=opts.max_tokens, shuffle_seed=None,
                       pad_id=pad_id(self.processor)) if mine else []

        # Target-token counts of the whole step, per task, summed over ranks (one small reduce).
        local = torch.zeros(len(TASKS))
        for ex in mine:
            local[TASKS.index(ex.task)] += ex.n_target
        n_micro = len(batches)
        if acc.num_processes > 1:
            local = acc.reduce(local.to(acc.device), reduction="sum").cpu()
            n_micro = int(acc.gather(torch.tensor([n_micro], device=acc.device)).max())
        counts = {t: float(local[i]) for i, t in enumerate(TASKS)}
        counts["all"] = sum(counts.values())

        # Logged statistics: [loss, NLL sum per task, target tokens per task], reduced at the end.
        stats = torch.zeros(1 + 2 * len(TASKS), dtype=torch.float64)
        for m in range(n_micro):
            padding = m >= len(batches)                     # this rank ran out: weight-0 repeat
            batch = batches[-1] if padding else batches[m]
            sync = acc.no_sync(wrapper) if m < n_micro - 1 else nullcontext()
            with sync, acc.autocast():
                logp, n_tok = wrapper(batch.to(acc.device))   # [n_ex] f32, [n_ex]
                weights = loss_weights(batch.tasks, counts, opts).to(logp.device)
                loss = -(weights * logp).sum()
                # DDP averages gradients over ranks; scaling by the world size turns that back into
                # the sum, so the loss is the exact mean over the whole step.
                scaled = loss * (0.0 if padding else float(acc.num_processes))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {step}; questions in "
                                       f"this batch: {sorted(set(batch.groups))}")
            acc.backward(scaled)
            if not padding:
                stats[0] += float(loss.detach())
                for task, lp, nt in zip(batch.tasks, logp.detach().tolist(), n_tok.tolist()):
                    stats[1 + TASKS.index(task)] -= lp
                    stats[1 + len(TASKS) + TASKS.index(task)] += nt
        if acc.num_processes > 1:
            stats = acc.reduce(stats.to(acc.device), reduction="sum").cpu()
        if opts.max_grad_norm:
            acc.clip_grad_norm_([p for p in wrapper.parameters() if p.requires_grad], opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "loss": float(stats[0]), "lr": scheduler.get_last_lr()[0]}
        for i, name in enumerate(("L_SFT", "L_REF", "L_SEL", "L_WARM")):
            tokens = float(stats[1 + len(TASKS) + i])
            if tokens:
                record[name] = float(stats[1 + i]) / tokens
        return record
