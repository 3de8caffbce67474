"""Training examples of the R³V mix and their tokenization.

An :class:`Example` is one (image, prompt, target) triple of the SFT, refine, select or warm-up
task. :func:`tokenize_examples` turns examples into :class:`TokenizedExample` s: the prompt goes
through the model's own processor (which expands the image placeholder into the image tokens and
produces the image tensors), the target through the plain tokenizer, then the end-of-turn token
is appended. Tokenizing prompt and target separately fixes the prompt/target boundary exactly
(one BPE pass over the joined text could merge tokens across it), and gives every example of a
question the same prompt-prefix tokens, which tree packing relies on.

For M-RoPE models (Qwen2-VL, Qwen2.5-VL) each example also gets its 3-row (t, h, w) rope position
ids, computed exactly as the model's ``get_rope_index`` does for one image + text sequence, so
that a packed trie can reuse them token for token: a branch then continues from its parent's
last position by construction.

An example longer than ``max_length`` is dropped and counted (never truncated: a cut target
would teach the model to stop mid-rationale). Image tensors are shared by all examples of the
same image file, so a group of five examples holds its image once.

Two routes give the same tokens and tensors (docs/architecture.md, "The data path"):

- :func:`tokenize_examples` (``--data-path eager``): every example through the processor with
  its image, all up front; the image is decoded and processed once per example.
- :func:`encode_image` + :func:`tokenize_with_image` (the streaming path): an image goes through
  the processor once, with one of its prompts; every prompt of that image is then tokenized as
  text with one placeholder token, which is repeated as many times as the processor expanded
  it (:func:`prompt_token_ids`; checked against the processor's own tokens on every image).

:class:`ExampleLengths` counts tokens without any image: a byte bound that needs no tokenizer
run, or the exact count from the text and the image's token count
(r3v_fast.model.image_tokens), for deciding up front which examples fit ``max_length``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from r3v_fast.data.records import load_image
from r3v_fast.model.loading import end_of_turn_id, tokenizer_of

__all__ = ["Example", "TokenizedExample", "tokenize_examples", "tokenize_with_image", "encode_image",
           "prompt_token_ids", "ExampleLengths", "ImageRejected", "mrope_positions",
           "image_token_id", "TASKS"]

TASKS = ("sft", "refine", "select", "warmup")


@dataclass(frozen=True)
class Example:
    """One training example of the R³V mix, as text (built by r3v_fast.engine.tasks)."""

    task: str      # "sft" | "refine" | "select" | "warmup"
    group: str     # record id: all examples of one group share image + question (a prompt prefix)
    image: str     # image file path ("" for a text-only example)
    prompt: str    # fully rendered chat prompt incl. generation prompt
    target: str    # target text; tokenization appends the end-of-turn token
    question_id: str = ""   # for error messages


@dataclass(eq=False)
class TokenizedExample:
    """An example as model tokens, with its image tensors and (M-RoPE models) rope ids."""

    input_ids: torch.Tensor          # [L] int64: prompt (image tokens expanded) + target + end-of-turn
    n_target: int                    # the last n_target tokens are the target (end-of-turn included)
    task: str
    group: str
    index: int                       # position in the list given to tokenize_examples
    question_id: str = ""
    image: str = ""                  # image path (tries check that a group shares one image)
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # processor image tensors, e.g.
    # Qwen2-VL: pixel_values [patches, C*t*p*p], image_grid_thw [1, 3]; LLaVA: pixel_values [1, 3, H, W]
    image_spans: tuple[tuple[int, int], ...] = ()   # [start, end) of each run of image tokens
    rope_positions: torch.Tensor | None = None     # [3, L] int64 M-RoPE (t, h, w) ids; None: 1-D rope

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_prompt(self) -> int:
        return len(self) - self.n_target


# ---------------------------------------------------------------------------- processor facts
def image_token_id(processor) -> int | None:
    """Id of the image placeholder token after expansion (<|image_pad|>, <image>), if any."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = tokenizer_of(processor).convert_tokens_to_ids(processor.image_token)
    return token_id


def _spatial_merge_size(processor) -> int | None:
    """Qwen-VL image processors merge s x s patches into one token; None for 1-D rope models."""
    return getattr(getattr(processor, "image_processor", None), "merge_size", None)


def mrope_positions(input_ids: torch.Tensor, image_token: int | None, grid_thw: torch.Tensor | None,
                    merge_size: int) -> torch.Tensor:
    """[3, L] M-RoPE ids of one sequence, as Qwen2-VL's get_rope_index computes them.

    Text tokens: all three rows equal, counting on from the last position. An image of merged
    grid (t, h, w) placed at position s gets t-row s + t_idx, h-row s + h_idx, w-row s + w_idx,
    and the text after it continues at s + max(h, w).
    """
    ids = input_ids.tolist()
    rows: list[torch.Tensor] = []
    pos, i, image_no = 0, 0, 0
    while i < len(ids):
        if image_token is not None and ids[i] == image_token:
            t, h, w = (int(x) for x in grid_thw[image_no])
            h, w = h // merge_size, w // merge_size
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            rows.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)   # [3, t*h*w]
            i += t * h * w
            pos += max(h, w)
            image_no += 1
        else:
            j = i
            while j < len(ids) and not (image_token is not None and ids[j] == image_token):
                j += 1
            rows.append(torch.arange(pos, pos + j - i).expand(3, -1))      # [3, j - i]
            pos += j - i
            i = j
    return torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)


def _image_spans(input_ids: torch.Tensor, image_token: int | None) -> tuple[tuple[int, int], ...]:
    if image_token is None:
        return ()
    is_image = (input_ids == image_token).to(torch.int8)
    edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return tuple(zip(starts.tolist(), ends.tolist()))


# ---------------------------------------------------------------------------- tokenization
_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")


def who_of(ex: Example, index: int) -> str:
    """How error messages name an example: its question, task and position."""
    return f"question {ex.question_id or ex.group!r} ({ex.task} example {index})"


def _build(ex: Example, index: int, prompt_ids: torch.Tensor, target_ids: list[int], eot: int,
           image_inputs: dict[str, torch.Tensor], image_token: int | None, merge_size: int | None,
           max_length: int, dropped: Counter) -> TokenizedExample | None:
    """One TokenizedExample from its prompt ids [P] and target ids, or None (dropped, counted)."""
    input_ids = torch.cat([prompt_ids, torch.tensor(target_ids + [eot], dtype=torch.long)])  # [L]
    if input_ids.numel() > max_length:
        dropped["too long"] += 1
        return None
    spans = _image_spans(prompt_ids, image_token)
    if bool(ex.image) != bool(spans):
        raise ValueError(f"{who_of(ex, index)}: the prompt has {len(spans)} image placeholder(s) but "
                         f"{'an image' if ex.image else 'no image'} was given")
    rope = None
    if merge_size is not None:
        rope = mrope_positions(input_ids, image_token, image_inputs.get("image_grid_thw"), merge_size)
    return TokenizedExample(
        input_ids=input_ids, n_target=len(target_ids) + 1, task=ex.task, group=ex.group, index=index,
        question_id=ex.question_id, image=ex.image, image_inputs=image_inputs, image_spans=spans,
        rope_positions=rope)


def _check_task(ex: Example, index: int) -> None:
    if ex.task not in TASKS:
        raise ValueError(f"{who_of(ex, index)}: unknown task {ex.task!r} (expected one of {TASKS})")


def tokenize_examples(processor, examples: Sequence[Example], *, max_length: int,
                      stats: dict | None = None) -> tuple[list[TokenizedExample], Counter]:
    """Tokenize ``examples`` (order kept); returns the kept ones and the dropped counts by reason.

    Every example goes through the processor with its image (decoded and processed once per
    example); the tensors of the first use of each image file are kept for all its examples.
    Dropped: "too long" (prompt + target + end-of-turn > max_length tokens). Bad input (unknown
    task, unreadable image, prompt without the image placeholder) raises ValueError naming the
    question. ``stats``, if given, accumulates "image_cpu_s" (CPU seconds spent decoding and
    processing images, the prompt's tokenization included) and "images_processed".
    """
    tokenizer = tokenizer_of(processor)
    eot = end_of_turn_id(processor)
    image_token = image_token_id(processor)
    merge_size = _spatial_merge_size(processor)
    shared_images: dict[str, dict[str, torch.Tensor]] = {}   # path -> image tensors of its first use
    kept: list[TokenizedExample] = []
    dropped: Counter = Counter()
    for index, ex in enumerate(examples):
        who = who_of(ex, index)
        _check_task(ex, index)
        started = time.process_time()
        images = [load_image(ex.image, who=who)] if ex.image else None
        try:
            encoded = processor(text=[ex.prompt], images=images, return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as err:   # e.g. no image placeholder
            raise ValueError(f"{who}: the processor rejects prompt + image {ex.image!r}: {err}") from err
        if stats is not None and images:
            stats["image_cpu_s"] = stats.get("image_cpu_s", 0.0) + time.process_time() - started
            stats["images_processed"] = stats.get("images_processed", 0) + 1
        target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        image_inputs: dict[str, torch.Tensor] = {}
        if ex.image:
            image_inputs = shared_images.get(ex.image) or {k: v for k, v in encoded.items() if k in _IMAGE_KEYS}
        tokenized = _build(ex, index, encoded["input_ids"][0], target_ids, eot, image_inputs, image_token,
                           merge_size, max_length, dropped)
        if tokenized is not None:
            kept.append(tokenized)
            if ex.image:
                shared_images.setdefault(ex.image, image_inputs)     # kept examples only
    return kept, dropped


# ---------------------------------------------------------------------------- one image, many prompts
class ImageRejected(ValueError):
    """The processor refuses an image (raised by :func:`encode_image`)."""


def _expand(ids: list[int], image_token: int | None, n_image_tokens: int, *, who: str) -> list[int]:
    """``ids`` of a prompt tokenized with its one placeholder token, the placeholder repeated
    ``n_image_tokens`` times (0: a text-only prompt, which must have no placeholder)."""
    at = [i for i, t in enumerate(ids) if t == image_token] if image_token is not None else []
    if len(at) != (1 if n_image_tokens else 0):
        raise ValueError(f"{who}: the prompt has {len(at)} image placeholder(s) but "
                         f"{'one image was' if n_image_tokens else 'no image was'} given")
    if not n_image_tokens:
        return ids
    return ids[:at[0]] + [image_token] * n_image_tokens + ids[at[0] + 1:]


def prompt_token_ids(processor, prompt: str, n_image_tokens: int, *, who: str) -> list[int]:
    """The prompt tokens the processor gives ``prompt`` with an image of ``n_image_tokens``
    tokens, without touching the image: the text is tokenized with its one placeholder token,
    which is then repeated ``n_image_tokens`` times (the placeholder is a special token, so the
    text around it tokenizes the same whatever its count; :func:`encode_image` checks this
    against the processor). ``n_image_tokens`` 0: a text-only prompt. ValueError unless the
    prompt has exactly one placeholder (none when text-only)."""
    ids = tokenizer_of(processor)(prompt)["input_ids"]
    return _expand(ids, image_token_id(processor), n_image_tokens, who=who)


def encode_image(processor, image, prompt: str, *, who: str) -> tuple[dict[str, torch.Tensor], int]:
    """The processor's tensors for ``image`` and the number of tokens it expands into.

    The image goes through the processor together with ``prompt`` (one of the prompts that use
    it), exactly as :func:`tokenize_examples` does, and :func:`prompt_token_ids` is checked
    against the processor's own prompt tokens: a processor whose expansion differs is refused
    with ValueError rather than trained on different tokens. :class:`ImageRejected` when the
    processor refuses the image itself (e.g. an extreme aspect ratio).
    """
    image_token = image_token_id(processor)
    text_ids = tokenizer_of(processor)(prompt)["input_ids"]
    _expand(text_ids, image_token, 1, who=who)          # exactly one placeholder, else ValueError
    try:
        encoded = processor(text=[prompt], images=[image], return_tensors="pt")
    except (ValueError, TypeError, RuntimeError) as err:
        raise ImageRejected(f"{who}: the processor rejects the image: {err}") from err
    ids = encoded["input_ids"][0]
    count = int((ids == image_token).sum())
    if _expand(text_ids, image_token, count, who=who) != ids.tolist():
        raise ValueError(f"{who}: this processor's prompt tokens cannot be computed apart from its "
                         "image (the tokens around the image placeholder change with the image); "
                         "use --data-path eager")
    return {k: v for k, v in encoded.items() if k in _IMAGE_KEYS}, count


def tokenize_with_image(processor, items: Sequence[tuple[int, Example]], image_inputs: dict[str, torch.Tensor],
                        n_image_tokens: int, *, max_length: int) -> tuple[list[TokenizedExample], Counter]:
    """Tokenize examples that share one image whose tensors (from :func:`encode_image`) are
    given: the same tokens and tensors as :func:`tokenize_examples`, with the image processed
    once for all of them. ``items`` are (index, example) pairs; a text-only example takes no
    image tokens and no tensors. Returns the kept examples and the dropped counts."""
    tokenizer = tokenizer_of(processor)
    eot = end_of_turn_id(processor)
    image_token = image_token_id(processor)
    merge_size = _spatial_merge_size(processor)
    kept: list[TokenizedExample] = []
    dropped: Counter = Counter()
    for index, ex in items:
        _check_task(ex, index)
        prompt_ids = torch.tensor(prompt_token_ids(processor, ex.prompt, n_image_tokens if ex.image else 0,
                                                   who=who_of(ex, index)), dtype=torch.long)  # [P]
        target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        tokenized = _build(ex, index, prompt_ids, target_ids, eot, image_inputs if ex.image else {},
                           image_token, merge_size, max_length, dropped)
        if tokenized is not None:
            kept.append(tokenized)
    return kept, dropped


class ExampleLengths:
    """Token counts of examples from their text and their image's token count, no pixels.

    :meth:`bound` needs no tokenizer run: every token of a byte-level BPE or SentencePiece
    tokenizer covers at least one byte of the text (one more for a word-start marker), the
    tokenizer adds its special tokens, the placeholder becomes the image's tokens and the
    end-of-turn token closes the target. :meth:`exact` tokenizes the text (the prompt with one
    placeholder, as :func:`prompt_token_ids`).
    """

    def __init__(self, processor):
        self.processor = processor
        self.added_specials = len(tokenizer_of(processor)("")["input_ids"])   # e.g. LLaVA's <s>

    def bound(self, ex: Example, n_image_tokens: int) -> int:
        prompt = len(ex.prompt.encode("utf-8")) + 1 + self.added_specials + n_image_tokens
        return prompt + len(ex.target.encode("utf-8")) + 1 + 1

    def exact(self, ex: Example, n_image_tokens: int, *, who: str) -> int:
        prompt = prompt_token_ids(self.processor, ex.prompt, n_image_tokens if ex.image else 0, who=who)
        target = tokenizer_of(self.processor)(ex.target, add_special_tokens=False)["input_ids"]
        return len(prompt) + len(target) + 1
