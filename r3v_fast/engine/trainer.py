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

Data (``--data-path``, docs/architecture.md "The data path"): the step plan is a deterministic
function of which examples fit ``max_length`` (``plan_steps``). ``stream`` (the default) decides
that from token counts and has DataLoader workers load, tokenize and pack each step's share
when it is near (r3v_fast.engine.stream); ``eager`` (the baseline) tokenizes every example with
its image up front and packs each step in the training process. Both give the same
micro-batches. A question whose image cannot be read is left out, logged once with its error
and reported in the summary (``skipped``, ``skipped_questions``).

Runs as one process or under ``accelerate launch`` (DDP / FSDP2): groups of a step are dealt
out to ranks, and each rank loads only its own groups; every rank runs the same number of
micro-batches (a rank with fewer repeats its last one with weight 0), and only the main
process writes files. Under FSDP2 each decoder layer is a ``fully_shard`` unit; saved tensors
are gathered into full tensors first (docs/architecture.md, "Several processes").

Training state (trainable weights, optimizer, scheduler, RNG states, step) is saved every
``save_every`` steps and when interrupted (Ctrl-C / SIGTERM), so ``--resume`` continues
from the last saved step with the same batch order. A save replaces the previous one
atomically (a new folder, then a pointer file switched by rename), and the saved tensors are
full tensors gathered from every rank, so a state saved under FSDP resumes under any number
of processes. Files are read back with ``weights_only=True``: a pickle placed there is refused.

Non-finite steps: a state is saved only once its weights have been seen to give a finite loss
and gradient, i.e. the state at step s is written inside step s, after its forward and
backward and before its update. A step whose loss or gradient norm is not finite never updates
the weights: with ``--skip-nonfinite N`` up to N such steps are skipped (logged with their
questions), beyond that :class:`TrainingDiverged` stops training and the saved state stays the
last finite one, so a resume (with a lower ``--lr``) starts from finite weights.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from r3v_fast.config import TrainOptions
from r3v_fast.engine.examples import TASKS, Example, tokenize_examples
from r3v_fast.engine.packing import pack
from r3v_fast.engine.stream import (Skip, StepBatch, measure_lengths, rank_share, step_loader,
                                    workers_started)
from r3v_fast.engine.scoring import TargetLogprobs
from r3v_fast.model.loading import decoder_layer_classes, pad_id

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stops, naming the step, its questions and the
    step of the training state kept on disk."""


class TrainStateError(RuntimeError):
    """The saved training state (``train_state/``) cannot be read back: damaged or foreign."""


def resumed_hyperparameters(optimizer, scheduler, options: TrainOptions) -> None:
    """After a saved state is loaded: the optimizer's and the schedule's peak learning rate and
    weight decay are the run's current settings, not the saved ones (``--resume --lr 1e-5``
    after a divergence). The schedule keeps its position: the current learning rate is the
    (possibly new) schedule's factor at the saved step times the new peak."""
    scheduler.base_lrs = [options.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = options.lr
        group["lr"] = options.lr * factor(scheduler.last_epoch)
        group["weight_decay"] = options.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def apply_lora(model, options: TrainOptions, seed: int = 0):
    """Wrap the language model's linear layers with LoRA adapters (the vision tower stays frozen).

    The adapters' random initialisation is drawn from ``seed`` (the global random state is left
    as it was): every rank starts from the same adapters, which FSDP needs, since each rank
    keeps its own shard of what it initialised, and a run is reproducible."""
    if options.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=LORA_TARGETS, bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
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


def is_fsdp(accelerator) -> bool:
    """Whether the model is sharded with FSDP (r3v_fast.train sets it up: FSDP2 only)."""
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (an FSDP2 shard) is all-gathered (a collective: every rank
    calls it, in the same order), a plain tensor is returned detached."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor().detach() if isinstance(t, DTensor) else t.detach()


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` in the layout of ``param``: its device and dtype, and its shard when ``param`` is
    a DTensor (each rank keeps its own part of the full tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device_mesh.device_type, param.dtype), param.device_mesh,
                                 param.placements)
    return full.to(param.device, param.dtype)


def gathered(tensors, keep: bool) -> Iterator:
    """(key, full CPU tensor) for each (key, tensor) pair, every rank taking part in each gather;
    the value is None where ``keep`` is false, so that only one process holds the whole copy
    in host memory."""
    for key, value in tensors:
        value = full_tensor(value)
        yield key, (value.cpu() if keep else None)


def full_optimizer_state(optimizer, keep: bool = True) -> dict | None:
    """``optimizer.state_dict()`` with every DTensor (FSDP2 shards of the moments) gathered into a
    full CPU tensor, so that the file does not depend on the number of ranks; None where
    ``keep`` is false (every rank must call it: the gathers are collectives)."""
    state = optimizer.state_dict()
    full = {}
    for index, entry in sorted(state["state"].items()):
        tensors = sorted((k, v) for k, v in entry.items() if torch.is_tensor(v))
        full[index] = {**{k: v for k, v in entry.items() if not torch.is_tensor(v)}, **dict(gathered(tensors, keep))}
    return {"state": full, "param_groups": state["param_groups"]} if keep else None


def load_full_optimizer_state(optimizer, state: dict) -> None:
    """Inverse of ``full_optimizer_state``: load, then cut each moment of a sharded parameter
    back to this rank's shard."""
    optimizer.load_state_dict(state)
    inner = getattr(optimizer, "optimizer", optimizer)       # accelerate's AcceleratedOptimizer
    for group in inner.param_groups:
        for param in group["params"]:
            entry = inner.state.get(param, {})
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    entry[key] = like(param, value)


def rng_states() -> dict:
    """This process's random states (Python, torch CPU, CUDA): LoRA dropout draws from torch's."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_plain(path: Path):
    """``torch.load`` of tensors and plain containers only (``weights_only=True``): a file that
    would need arbitrary unpickling (and could run code) is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests re-running with weights_only=False, the opposite of what a
        # refused state file deserves: keep only the unpickler's own reason.
        found = re.search(r"WeightsUnpickler error: ([^\n]+?)(?: was not an allowed global|$)", str(err),
                          re.MULTILINE)
        reason = found.group(1).strip() if found else "it holds objects other than tensors"
        raise TrainStateError(f"{path}: refused to load: not a plain tensor file ({reason}). It was not "
                              f"written by r3v_fast; remove {path.parent.parent} to restart this training "
                              "phase from step 0") from None


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
                 log=print, show_progress: bool = True, seed: int = 0, on_step=None):
        self.model = model
        self.processor = processor
        self.accelerator = accelerator
        self.options = options
        self.seed = seed
        self.on_step = on_step          # called with every step's record (all ranks hold the same)
        self.state_dir = Path(state_dir)
        self.log = log
        self.show_progress = show_progress
        self._skips: dict = {}             # example index -> Skip, for this train() call
        self._last_batch = None            # this rank's last micro-batch (weight-0 padding)
        self._plan_report: dict = {}
        self._saved_step = 0               # the step of the training state on disk (0: none)
        self._nonfinite_skipped = 0        # non-finite steps skipped in this train() call

    # ----------------------------------------------------------------------------- state
    # train_state/ holds ``current.json`` ({"step": n, "dir": "step_<n>_<stamp>"}) and the folder
    # it names: trainable.safetensors (trainable weights, full tensors), optimizer.pt (optimizer
    # and scheduler state, full tensors; read with weights_only=True, so a pickle placed there
    # cannot run code), rng_rank<r>.pt (each rank's RNG states, which LoRA dropout draws from).
    # A save writes a new folder, then replaces current.json atomically, then removes older
    # folders: a kill at any point leaves the previous state or the new one, never none.
    def _trainable_state(self, wrapper) -> dict[str, torch.Tensor] | None:
        """Trainable weights as full CPU tensors on the main process, None on the others (every
        rank must call it: under FSDP each tensor is all-gathered)."""
        model = self.accelerator.unwrap_model(wrapper).model
        keep = self.accelerator.is_main_process
        weights = dict(gathered(((n, p) for n, p in model.named_parameters() if p.requires_grad), keep))
        return {n: w.contiguous() for n, w in weights.items()} if keep else None

    def _save_state(self, wrapper, optimizer, scheduler, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.state_dir / f"step_{step:07d}_{time.time_ns()}"
        if acc.num_processes > 1:            # every rank writes into the main process's folder
            from accelerate.utils import broadcast_object_list

            chosen = [str(folder)]
            broadcast_object_list(chosen)
            folder = Path(chosen[0])
        if acc.is_main_process:
            folder.mkdir(parents=True)
        acc.wait_for_everyone()
        # Gathered on every rank (FSDP shards are all-gathered), written by the main process.
        weights = self._trainable_state(wrapper)
        optimizer_state = full_optimizer_state(optimizer, keep=acc.is_main_process)
        torch.save(rng_states(), folder / f"rng_rank{acc.process_index}.pt")
        if acc.is_main_process:
            from safetensors.torch import save_file

            save_file(weights, str(folder / "trainable.safetensors"))
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
                       folder / "optimizer.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            from r3v_fast.engine.rundir import atomic_write_text

            atomic_write_text(self.state_dir / "current.json", json.dumps({"step": step, "dir": folder.name}))
            for old in self.state_dir.iterdir():
                if old.is_dir() and old.name != folder.name:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def saved_step(self) -> tuple[int, Path | None]:
        """(step, folder) of the saved training state, (0, None) when there is none."""
        pointer = self.state_dir / "current.json"
        if not pointer.exists():
            return 0, None
        try:
            current = json.loads(pointer.read_text())
            return int(current["step"]), self.state_dir / current["dir"]
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(f"{pointer}: unreadable training state pointer ({err}); remove "
                               f"{self.state_dir} to restart this training phase from step 0") from None

    def _load_state(self, wrapper, optimizer, scheduler) -> int:
        step, folder = self.saved_step()
        if folder is None:
            return 0
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(wrapper).model
        weights = load_file(str(folder / "trainable.safetensors"))
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
        if missing:
            raise RuntimeError(f"{folder}: saved training state does not match the model "
                               f"(missing {missing[:3]}...)")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in weights:
                    p.copy_(like(p, weights[n]))
        saved = load_plain(folder / "optimizer.pt")
        load_full_optimizer_state(optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng = folder / f"rng_rank{self.accelerator.process_index}.pt"
        if rng.exists():
            set_rng_states(load_plain(rng))
        return step

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained model's whole state dict as CPU tensors on the main process (empty on the
        others). Every rank must call it: under FSDP each tensor is all-gathered in turn, and
        only the main process keeps a copy, so host memory holds one model, on one process."""
        keep = self.accelerator.is_main_process
        return {n: v for n, v in gathered(self.model.state_dict().items(), keep) if keep}

    # ----------------------------------------------------------------------------- plan
    def _gather(self, value) -> list:
        """``value`` of every rank, in rank order (a list of one on a single process)."""
        if self.accelerator.num_processes == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def _plan_eager(self, examples: Sequence[Example], stats: dict):
        """--data-path eager: every example tokenized with its image, up front, on every rank."""
        opts = self.options
        tokenized, dropped = tokenize_examples(self.processor, examples, max_length=opts.max_length, stats=stats)
        kept = [t.index for t in tokenized]
        steps = plan_steps([examples[i] for i in kept], opts.batch_size, opts.epochs, self.seed)
        return tokenized, steps, dropped, []

    def _plan_stream(self, examples: Sequence[Example]):
        """--data-path stream: which examples fit, from token counts (each rank measures a share
        of the question groups, the decisions are exchanged), then the same step plan as eager,
        as indices into ``examples``."""
        opts, acc = self.options, self.accelerator
        groups = sorted({ex.group for ex in examples})
        measured = set(groups[acc.process_index::acc.num_processes])
        indices = [i for i, ex in enumerate(examples) if ex.group in measured]
        plans = self._gather(measure_lengths(self.processor, examples, indices, max_length=opts.max_length))
        dropped = {i: why for plan in plans for i, why in plan.dropped.items()}
        skipped = [skip for plan in plans for skip in plan.skipped]
        left_out = set(dropped) | {i for skip in skipped for i in skip.indices}
        kept = [i for i in range(len(examples)) if i not in left_out]
        steps = [[kept[j] for j in step]
                 for step in plan_steps([examples[i] for i in kept], opts.batch_size, opts.epochs, self.seed)]
        self._plan_report = {"plan_seconds": max(p.seconds for p in plans),
                             "plan_tokenized": sum(p.tokenized for p in plans)}
        return kept, steps, Counter(dropped.values()), skipped

    # ----------------------------------------------------------------------------- batches
    def _eager_batches(self, tokenized, steps, start: int) -> Iterator[StepBatch]:
        """This rank's share of each step, packed in the training process (the baseline)."""
        acc, opts = self.accelerator, self.options
        for s in range(start, len(steps)):
            step = steps[s]
            mine = sorted(pos for group in rank_share(tokenized, step, acc.process_index, acc.num_processes)
                          for pos in group)
            share = [tokenized[step[pos]] for pos in mine]
            batches = pack(share, mode=opts.packing, max_tokens=opts.max_tokens, shuffle_seed=None,
                           pad_id=pad_id(self.processor)) if share else []
            yield StepBatch(step=s, batches=batches, skipped=[], late_too_long=[])

    @contextmanager
    def _stream_batches(self, examples, steps, start: int) -> Iterator[Iterator[StepBatch]]:
        """This rank's share of each step, loaded and packed by DataLoader workers."""
        acc, opts = self.accelerator, self.options
        loader = step_loader(self.processor, examples, steps, start=start, rank=acc.process_index,
                             world=acc.num_processes, mode=opts.packing, max_tokens=opts.max_tokens,
                             max_length=opts.max_length, pad_id=pad_id(self.processor),
                             num_workers=opts.num_workers, pin_memory=acc.device.type == "cuda", seed=self.seed)
        with workers_started():
            iterator = iter(loader)
        yield iterator

    # ----------------------------------------------------------------------------- train
    def train(self, examples: Sequence[Example], *, max_steps: int | None = None) -> dict:
        """Train on ``examples``; returns a summary (steps, dropped and skipped examples, last
        losses, time). ``max_steps`` stops after that many optimizer steps of this call
        (benchmarks; the training state is then not saved)."""
        opts, acc = self.options, self.accelerator
        t0 = time.time()
        image_stats: dict = {}
        self._plan_report = {}
        if opts.data_path == "eager":
            source, steps, dropped, plan_skips = self._plan_eager(examples, image_stats)
            n_kept = len(source)
        else:
            kept, steps, dropped, plan_skips = self._plan_stream(examples)
            source, n_kept = examples, len(kept)
        if dropped:
            self.log(f"dropped {sum(dropped.values())} over-long examples: {dict(dropped)}")
        self._skips = {}
        for skip in plan_skips:       # the same list on every rank: the main process says it
            self._note_skip(skip, announce=getattr(acc, "is_main_process", True))
        if not n_kept:
            raise ValueError("no trainable example left (all dropped or none built)")

        wrapper = TargetLogprobs(self.model, loss=opts.loss)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        scheduler = lr_schedule(optimizer, opts.lr_scheduler, opts.warmup_steps, len(steps))
        if is_fsdp(acc) and not acc.state.fsdp_plugin.transformer_cls_names_to_wrap:
            # Each decoder layer its own FSDP2 unit (fully_shard, applied by prepare).
            acc.state.fsdp_plugin.transformer_cls_names_to_wrap = decoder_layer_classes(self.model)
        wrapper, optimizer = acc.prepare(wrapper, optimizer)
        # Training's random draws (LoRA dropout) start from (seed, rank), whatever ran before in
        # this process, so that a run is reproducible; a resumed run then takes the saved states.
        random.seed(f"{self.seed}:{acc.process_index}")
        torch.manual_seed(self.seed * 65_536 + acc.process_index)
        try:
            start = self._load_state(wrapper, optimizer, scheduler)
        except TrainStateError:
            raise
        except Exception as err:       # whatever a damaged file makes its reader raise
            raise TrainStateError(f"{self.state_dir}: the saved training state cannot be read ({err}); "
                                  "delete that folder to restart this training phase from step 0") from err
        self._saved_step, self._nonfinite_skipped = start, 0
        if start:
            resumed_hyperparameters(optimizer, scheduler, opts)
            self.log(f"resuming training at step {start}/{len(steps)}")
        wrapper.train()
        end = len(steps) if max_steps is None else min(len(steps), start + max_steps)

        history: list[dict] = []
        self._last_batch = None
        bar = tqdm(total=len(steps), initial=start, desc="training", unit="step",
                   disable=not (self.show_progress and acc.is_main_process))
        step = completed = start          # completed: optimizer steps done (what a save records)
        if opts.data_path == "eager":
            batches_of = nullcontext(self._eager_batches(source, steps, start))
        else:
            batches_of = self._stream_batches(source, steps, start)
        try:
            with interrupts_as_keyboard_interrupt(), batches_of as step_batches:
                for step in range(start, end):
                    asked = time.time()
                    step_batch = next(step_batches)
                    ready = time.time()
                    if step_batch.step != step:
                        raise RuntimeError(f"the data path delivered step {step_batch.step} for step {step}")
                    self._note_loaded(step_batch, image_stats)
                    record = self._step(wrapper, optimizer, scheduler, step_batch, step)
                    completed = step + 1
                    # Seconds since train() began: at the end of the step and when its batches
                    # were ready; and how long the step waited for them.
                    record.update(seconds=time.time() - t0, batch_ready_s=ready - t0, data_wait_s=ready - asked)
                    history.append(record)
                    if self.on_step is not None:
                        self.on_step(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                step = end
        except KeyboardInterrupt:
            self.log(f"interrupted at step {completed}: saving training state to {self.state_dir}")
            self._save_state(wrapper, optimizer, scheduler, completed)
            raise
        finally:
            bar.close()
        self.model = acc.unwrap_model(wrapper).model     # sharded under FSDP: see full_state_dict
        summary = {"steps": len(steps), "examples": n_kept, "dropped": dict(dropped), "history": history,
                   "seconds": time.time() - t0, "data_path": opts.data_path,
                   "nonfinite_skipped": self._nonfinite_skipped}
        for key in ("computed_tokens", "example_tokens", "target_tokens"):   # this call's steps, all ranks
            summary[key] = int(sum(r[key] for r in history))
        if is_fsdp(acc):          # how the model was cut: FSDP2 units (decoder layers, head, root)
            from torch.distributed.fsdp import FSDPModule

            summary["fsdp_units"] = sum(isinstance(m, FSDPModule) for m in wrapper.modules())
        summary.update(self._plan_report)
        summary.update(self._data_report(image_stats))
        return summary

    def _note_skip(self, skip: Skip, *, announce: bool = True) -> None:
        """Log a skipped group the first time it is met (on the rank that met it) and remember
        its examples."""
        if announce and not any(i in self._skips for i in skip.indices):
            message = (f"skipped {len(skip.indices)} example(s) of question {skip.question_id!r} "
                       f"({skip.reason}): {skip.message}")
            if getattr(self.accelerator, "is_main_process", True):
                self.log(message)
            else:                      # the run's log is the main process's; say it on stderr
                print(f"[rank {self.accelerator.process_index}] {message}", file=sys.stderr, flush=True)
        for i in skip.indices:
            self._skips.setdefault(i, skip)

    def _note_loaded(self, step_batch: StepBatch, image_stats: dict) -> None:
        for skip in step_batch.skipped:
            self._note_skip(skip)
        if step_batch.late_too_long:
            image_stats["late_too_long"] = image_stats.get("late_too_long", 0) + len(step_batch.late_too_long)
            self.log(f"step {step_batch.step}: {len(step_batch.late_too_long)} example(s) turned out longer than "
                     f"max_length when loaded and were left out: {step_batch.late_too_long[:10]}")
        image_stats["image_cpu_s"] = image_stats.get("image_cpu_s", 0.0) + step_batch.image_cpu_s
        image_stats["images_processed"] = image_stats.get("images_processed", 0) + step_batch.images_processed

    def _data_report(self, image_stats: dict) -> dict:
        """Skipped examples (by reason, with their questions) and image-processing cost, all ranks."""
        reports = self._gather({"skips": list(self._skips.items()), **image_stats})
        skips = {i: skip for report in reports for i, skip in report["skips"]}
        out = {"image_cpu_s": sum(r.get("image_cpu_s", 0.0) for r in reports),
               "images_processed": sum(r.get("images_processed", 0) for r in reports)}
        if skips:
            out["skipped"] = dict(Counter(skip.reason for skip in skips.values()))
            out["skipped_questions"] = sorted({skip.question_id for skip in skips.values()})
        late = sum(r.get("late_too_long", 0) for r in reports)
        if late:
            out["late_too_long"] = late
        return out

    def _step(self, wrapper, optimizer, scheduler, step_batch: StepBatch, step: int) -> dict:
        opts, acc = self.options, self.accelerator
        batches = step_batch.batches

        # Target-token counts of the whole step, per task, summed over ranks (one small reduce).
        local = torch.zeros(len(TASKS))
        for batch in batches:
            for task, n in zip(batch.tasks, batch.n_target_tokens.tolist()):
                local[TASKS.index(task)] += n
        n_micro = len(batches)
        if acc.num_processes > 1:
            local = acc.reduce(local.to(acc.device), reduction="sum").cpu()
            n_micro = int(acc.gather(torch.tensor([n_micro], device=acc.device)).max())
        counts = {t: float(local[i]) for i, t in enumerate(TASKS)}
        counts["all"] = sum(counts.values())
        if n_micro > len(batches) and not batches and self._last_batch is None:
            raise RuntimeError(f"step {step}: rank {acc.process_index} has no example in its first step and "
                               "nothing to pad the other ranks' micro-batches with; use fewer ranks or a "
                               "larger --batch-size")

        # Logged statistics: [loss, NLL sum per task, target tokens per task, computed token slots,
        # example tokens, target tokens], reduced at the end.
        stats = torch.zeros(1 + 2 * len(TASKS) + 3, dtype=torch.float64)
        nonfinite_groups: set[str] = set()                  # questions of this rank's non-finite micro-batches
        t0 = time.time()
        for m in range(n_micro):
            padding = m >= len(batches)                     # this rank ran out: weight-0 repeat
            batch = (batches[-1] if batches else self._last_batch) if padding else batches[m]
            sync = acc.no_sync(wrapper) if m < n_micro - 1 else nullcontext()
            weights = loss_weights(batch.tasks, counts, opts).to(acc.device)                # [n_ex]
            # DDP averages gradients over ranks; scaling by the world size turns that back into
            # the sum, so the loss is the exact mean over the whole step. The weights are known
            # before the forward, so the fused loss forms its LM-head gradients in the forward.
            scale = 0.0 if padding else float(acc.num_processes)
            with sync, acc.autocast():
                scaled, logp, n_tok = wrapper(batch.to(acc.device, non_blocking=True), weights * scale)
            loss = -(weights * logp).sum()                  # the step's loss, from the detached logp
            if not padding and not torch.isfinite(loss):
                nonfinite_groups.update(batch.groups)
            # A non-finite micro-batch still runs its backward: under several ranks every rank
            # takes part in every gradient all-reduce, and the verdict below is taken from the
            # reduced loss and gradient norm, which all ranks share.
            acc.backward(scaled)
            if not padding:
                stats[0] += float(loss.detach())
                stats[-3:] += torch.tensor([batch.n_slots, batch.n_example_tokens,
                                            int(n_tok.sum())], dtype=torch.float64)
                for task, lp, nt in zip(batch.tasks, logp.detach().tolist(), n_tok.tolist()):
                    stats[1 + TASKS.index(task)] -= lp
                    stats[1 + len(TASKS) + TASKS.index(task)] += nt
        if batches:
            self._last_batch = batches[-1]
        if acc.num_processes > 1:
            stats = acc.reduce(stats.to(acc.device), reduction="sum").cpu()
        # The gradient norm is logged at every step; with --max-grad-norm 0 nothing is clipped.
        norm = acc.clip_grad_norm_([p for p in wrapper.parameters() if p.requires_grad],
                                   opts.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]                     # the rate this step runs at
        grad_norm = float(norm) if norm is not None else float("nan")
        finite = bool(torch.isfinite(stats[0])) and (norm is None or bool(torch.isfinite(torch.as_tensor(norm))))
        if finite:
            # These weights gave a finite loss and gradient: now they may be saved as the state
            # at this step (before the update, which could be the one that diverges).
            if opts.save_every and step > self._saved_step and step % opts.save_every == 0:
                self._save_state(wrapper, optimizer, scheduler, step)
                self._saved_step = step
            optimizer.step()
        else:
            self._nonfinite(step, float(stats[0]), grad_norm, nonfinite_groups, batches)
        scheduler.step()                                    # a skipped step keeps the schedule's pace
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - t0
        computed, example_tokens, target_tokens = (float(v) for v in stats[-3:])
        record = {"step": step, "loss": float(stats[0]), "lr": lr, "grad_norm": grad_norm,
                  "computed_tokens": computed, "example_tokens": example_tokens, "target_tokens": target_tokens,
                  "tokens_per_s": example_tokens / seconds if seconds > 0 else 0.0}
        for i, name in enumerate(("L_SFT", "L_REF", "L_SEL", "L_WARM")):
            tokens = float(stats[1 + len(TASKS) + i])
            if tokens:
                record[name] = float(stats[1 + i]) / tokens
        if not finite:
            record["skipped_nonfinite"] = True
        return record

    def _nonfinite(self, step: int, loss: float, grad_norm: float, groups: set[str], batches) -> None:
        """A step whose loss or gradient norm is not finite: no update. Skipped and logged
        while ``--skip-nonfinite`` allows, else :class:`TrainingDiverged`. Named questions: those
        of the non-finite micro-batches (of the whole step when only the gradient is), all ranks."""
        if not groups:
            groups = {g for batch in batches for g in batch.groups}
        questions = sorted({q for rank_groups in self._gather(sorted(groups)) for q in rank_groups})
        what = f"loss {loss}" if not torch.isfinite(torch.tensor(loss)) else f"gradient norm {grad_norm}"
        message = f"non-finite {what} at step {step}; questions in this step: {questions}"
        self._nonfinite_skipped += 1
        limit = self.options.skip_nonfinite
        if self._nonfinite_skipped > limit:
            kept = (f"the training state in {self.state_dir} is step {self._saved_step}, the last finite one"
                    if self._saved_step else "no training state was saved; training restarts at step 0")
            raise TrainingDiverged(f"{message}; training stopped (--skip-nonfinite {limit}); {kept}")
        self.log(f"skipped step {step} without an update ({self._nonfinite_skipped} of --skip-nonfinite "
                 f"{limit}): {message}")
