"""The streaming data path (``--data-path stream``): plan the steps from token counts, load each
step's images in DataLoader workers when the step is near.

docs/architecture.md, "The data path". Holding every example's image tensors for a whole
iteration costs 4.6 / 10.9 / 22.1 MiB per 448² / 800x600 / 1280x960 image with Qwen2-VL's
processor; here the host holds only the steps in flight.

1. **Lengths** (:func:`measure_lengths`). Which examples fit ``max_length`` is all the step plan
   needs (steps are whole question groups, cut by example count; r3v_fast.engine.trainer). An
   example's length is its text tokens plus its image's token count, which follows from the
   image size in the file header and the processor's resize rules (r3v_fast.model.image_tokens);
   no pixel is decoded. Most examples are settled by a byte bound without running the
   tokenizer (r3v_fast.engine.examples.ExampleLengths); the others are tokenized as text. Reading
   the header also validates every image cheaply (exists, known format, sane size): a group
   whose image fails is left out here, counted and named.
2. **Loading** (:class:`GroupLoader`, in a worker). A question group's image is decoded and
   processed once per step, with one of its prompts through the real processor (which checks
   that our token expansion matches it), and shared by all the group's examples; the prompts
   are tokenized as text. An image that fails only now (a truncated file, a file gone since the
   plan) leaves its group out of the step: the group comes back as a :class:`Skip` naming the
   question and the error, which the trainer logs and reports in its metrics; the run goes on.
3. **Packing** (:class:`StepCollator`, in the same worker): the step's examples of this rank, in
   step order, through :func:`r3v_fast.engine.packing.pack`, exactly as the eager path packs
   them, so both paths give the same micro-batches.

:class:`StepSampler` is the DataLoader's batch sampler: one batch per optimizer step (from any
start step, for resume), holding this rank's question groups of that step (round-robin over
the step's groups, as the trainer deals them). The work items carry the examples' text, so a
worker holds no copy of the example list. :func:`step_loader` builds the DataLoader:
``num_workers`` processes, two steps prefetched per worker, pinned memory on CUDA.
"""

from __future__ import annotations

import gc
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from r3v_fast.data.records import DataError, image_size, load_image
from r3v_fast.engine.examples import (Example, ExampleLengths, ImageRejected, TokenizedExample, encode_image,
                                      tokenize_with_image, who_of)
from r3v_fast.engine.packing import PackedBatch, pack
from r3v_fast.model.image_tokens import image_token_count

__all__ = ["Skip", "LengthPlan", "measure_lengths", "GroupWork", "LoadedGroup", "StepBatch", "GroupLoader",
           "StepCollator", "StepSampler", "rank_share", "step_loader", "default_num_workers", "workers_started"]


@dataclass(frozen=True)
class Skip:
    """Examples of one question left out because their image cannot be used."""

    question_id: str
    reason: str                 # "missing image", "corrupt image" or "bad image" (refused by the processor)
    message: str                # names the question and the file
    indices: tuple[int, ...]    # the examples left out (indices into the trainer's example list)


# ------------------------------------------------------------------------------ 1. lengths
@dataclass
class LengthPlan:
    """What the length pass decided for its share of the examples."""

    dropped: dict[int, str]     # example index -> reason ("too long")
    skipped: list[Skip]         # groups whose image failed the header check
    tokenized: int = 0          # examples whose length needed the tokenizer (the rest: byte bound)
    seconds: float = 0.0


def _image_tokens(processor, ex: Example, index: int) -> int:
    """Tokens the example's image expands into, from its header; DataError when the image
    cannot be used. Processors of unknown families are asked directly (decoding the image)."""
    who = who_of(ex, index)
    width, height = image_size(ex.image, who=who)
    try:
        count = image_token_count(processor, height, width)
    except ValueError as err:
        raise DataError(f"{who}: image {ex.image}: {err}", "bad image") from None
    if count is None:
        try:
            _, count = encode_image(processor, load_image(ex.image, who=who), ex.prompt, who=who)
        except ImageRejected as err:
            raise DataError(str(err), "bad image") from None
    return count


def measure_lengths(processor, examples: Sequence[Example], indices: Sequence[int], *,
                    max_length: int) -> LengthPlan:
    """Decide which of ``examples[indices]`` fit ``max_length`` tokens, without pixels.

    An image's token count is computed once per file; an example whose byte bound fits is kept
    without tokenizing it, the others are tokenized as text. A group whose image is missing,
    unreadable or refused is skipped as a whole (one :class:`Skip` per question).
    """
    started = time.perf_counter()
    lengths = ExampleLengths(processor)
    counts: dict[str, int | DataError] = {}
    plan = LengthPlan(dropped={}, skipped=[])
    failed: dict[str, list[int]] = defaultdict(list)       # group -> its examples, image unusable
    failure: dict[str, DataError] = {}
    for index in indices:
        ex = examples[index]
        n_image = 0
        if ex.image:
            if ex.image not in counts:
                try:
                    counts[ex.image] = _image_tokens(processor, ex, index)
                except DataError as err:
                    counts[ex.image] = err
            if isinstance(counts[ex.image], DataError):
                failed[ex.group].append(index)
                failure.setdefault(ex.group, counts[ex.image])
                continue
            n_image = counts[ex.image]
        if lengths.bound(ex, n_image) <= max_length:
            continue
        plan.tokenized += 1
        if lengths.exact(ex, n_image, who=who_of(ex, index)) > max_length:
            plan.dropped[index] = "too long"
    for group, members in failed.items():
        err = failure[group]
        plan.skipped.append(Skip(examples[members[0]].question_id or group, err.reason, str(err), tuple(members)))
    plan.seconds = time.perf_counter() - started
    return plan


# ------------------------------------------------------------------------------ 2. loading
@dataclass(frozen=True)
class GroupWork:
    """One question group of one step, as a worker receives it: (position in the step, example
    index, example) of each of its examples, in step order. No items: this rank has nothing in
    the step (the step number still travels)."""

    step: int
    items: tuple[tuple[int, int, Example], ...]


@dataclass
class LoadedGroup:
    step: int
    examples: list[tuple[int, TokenizedExample]]   # (position in the step, tokenized example)
    late_too_long: list[int]                       # over max_length although the plan kept them
    skip: Skip | None = None
    image_cpu_s: float = 0.0                       # CPU seconds decoding + processing its image
    images_processed: int = 0


class GroupLoader(Dataset):
    """``loader[work]``: a question group tokenized, its image decoded and processed once.

    Images are cached for the current step only, so a file shared by two questions of one step
    is processed once; nothing is kept across steps.
    """

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.max_length = max_length
        self._step: int | None = None
        self._images: dict[str, tuple[dict[str, torch.Tensor], int]] = {}

    def __getitem__(self, work: GroupWork) -> LoadedGroup:
        if work.step != self._step:
            self._step, self._images = work.step, {}
        if not work.items:
            return LoadedGroup(work.step, [], [])
        _, first_index, first = work.items[0]
        images = {ex.image for _, _, ex in work.items}
        if len(images) > 1:
            raise ValueError(f"group {first.group!r} mixes images {sorted(images)}: a group is one image + question")
        image_inputs, n_image, cpu, processed = {}, 0, 0.0, 0
        if first.image:
            cached = self._images.get(first.image)
            if cached is None:
                started = time.process_time()
                who = who_of(first, first_index)
                try:
                    cached = encode_image(self.processor, load_image(first.image, who=who), first.prompt, who=who)
                except (DataError, ImageRejected) as err:
                    reason = err.reason if isinstance(err, DataError) else "bad image"
                    skip = Skip(first.question_id or first.group, reason, str(err),
                                tuple(index for _, index, _ in work.items))
                    return LoadedGroup(work.step, [], [], skip=skip)
                cpu, processed = time.process_time() - started, 1
                self._images[first.image] = cached
            image_inputs, n_image = cached
        kept, _ = tokenize_with_image(self.processor, [(index, ex) for _, index, ex in work.items], image_inputs,
                                      n_image, max_length=self.max_length)
        position = {index: pos for pos, index, _ in work.items}
        late = sorted(set(position) - {t.index for t in kept})
        return LoadedGroup(work.step, [(position[t.index], t) for t in kept], late, None, cpu, processed)


# ------------------------------------------------------------------------------ 3. packing
@dataclass
class StepBatch:
    """This rank's share of one optimizer step, packed."""

    step: int
    batches: list[PackedBatch]       # the micro-batches
    skipped: list[Skip]              # groups left out of this step (image unusable)
    late_too_long: list[int]         # examples dropped here although the plan kept them
    image_cpu_s: float = 0.0
    images_processed: int = 0

    def pin_memory(self) -> "StepBatch":
        return replace(self, batches=[b.pin_memory() for b in self.batches])


class StepCollator:
    """The DataLoader's collate function: a step's loaded groups -> its packed micro-batches."""

    def __init__(self, mode: str, max_tokens: int, pad_id: int):
        self.mode, self.max_tokens, self.pad_id = mode, max_tokens, pad_id

    def __call__(self, groups: list[LoadedGroup]) -> StepBatch:
        steps = {g.step for g in groups}
        if len(steps) != 1:
            raise RuntimeError(f"one batch must hold one step, got steps {sorted(steps)}")
        ordered = sorted((item for g in groups for item in g.examples), key=lambda item: item[0])
        tokenized = [t for _, t in ordered]
        batches = pack(tokenized, mode=self.mode, max_tokens=self.max_tokens, shuffle_seed=None,
                       pad_id=self.pad_id) if tokenized else []
        return StepBatch(step=steps.pop(), batches=batches, skipped=[g.skip for g in groups if g.skip],
                         late_too_long=[i for g in groups for i in g.late_too_long],
                         image_cpu_s=sum(g.image_cpu_s for g in groups),
                         images_processed=sum(g.images_processed for g in groups))


# ------------------------------------------------------------------------------ the batch sampler
def rank_share(examples: Sequence, step: Sequence[int], rank: int, world: int) -> list[list[int]]:
    """Positions in ``step`` (example indices) of this rank's question groups, one list per
    group: the step's groups in order of first appearance, dealt round-robin to the ranks (a
    group's examples share their image + question prefix, which tree packing computes once)."""
    groups = list(dict.fromkeys(examples[i].group for i in step))
    mine: dict[str, list[int]] = {g: [] for g in groups[rank::world]}
    for pos, i in enumerate(step):
        members = mine.get(examples[i].group)
        if members is not None:
            members.append(pos)
    return list(mine.values())


class StepSampler(Sampler):
    """Yields, for each step from ``start`` on, this rank's question groups of the step as
    :class:`GroupWork` items (one batch per optimizer step)."""

    def __init__(self, examples: Sequence[Example], steps: Sequence[Sequence[int]], *, start: int = 0,
                 rank: int = 0, world: int = 1):
        self.examples, self.steps = examples, steps
        self.start, self.rank, self.world = start, rank, world

    def __len__(self) -> int:
        return max(0, len(self.steps) - self.start)

    def __iter__(self) -> Iterator[list[GroupWork]]:
        for s in range(self.start, len(self.steps)):
            step = self.steps[s]
            works = [GroupWork(s, tuple((pos, step[pos], self.examples[step[pos]]) for pos in positions))
                     for positions in rank_share(self.examples, step, self.rank, self.world)]
            yield works or [GroupWork(s, ())]


# ------------------------------------------------------------------------------ the DataLoader
def default_num_workers() -> int:
    """min(4, CPU cores available to this rank - 1): the cores of this process's affinity set,
    shared by the ranks of the node (LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                      # not Linux
        cores = os.cpu_count() or 1
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(4, cores // ranks_here - 1))


def step_loader(processor, examples: Sequence[Example], steps: Sequence[Sequence[int]], *, start: int,
                rank: int, world: int, mode: str, max_tokens: int, max_length: int, pad_id: int,
                num_workers: int | None, pin_memory: bool, seed: int = 0) -> DataLoader:
    """The DataLoader of this rank's steps ``start``.. (one :class:`StepBatch` per step, in order)."""
    workers = default_num_workers() if num_workers is None else num_workers
    return DataLoader(
        GroupLoader(processor, max_length),
        batch_sampler=StepSampler(examples, steps, start=start, rank=rank, world=world),
        collate_fn=StepCollator(mode, max_tokens, pad_id),
        num_workers=workers, prefetch_factor=2 if workers else None, pin_memory=pin_memory,
        # Worker seeds come from this generator, not from the global torch RNG, so that loading
        # leaves the training's random state exactly as the eager path does.
        generator=torch.Generator().manual_seed(seed))


@contextmanager
def workers_started():
    """Wrap the start of forked DataLoader workers (``iter(loader)``).

    - ``gc.freeze()``: the objects the parent holds (examples, records, the model's Python
      objects) move to a generation the garbage collector ignores, so collections in a worker
      do not write to them and the worker does not copy the parent's heap page by page.
    - ``TOKENIZERS_PARALLELISM=false`` for the children: a fast tokenizer that has used its
      thread pool warns at every fork and turns parallelism off in the child anyway; setting it
      explicitly silences that warning. The parent's setting is restored afterwards.
    """
    unset = "TOKENIZERS_PARALLELISM" not in os.environ
    if unset:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if unset:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
