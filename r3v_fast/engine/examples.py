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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from r3v_fast.data.records import load_image
from r3v_fast.model.loading import end_of_turn_id, tokenizer_of

__all__ = ["Example", "TokenizedExample", "tokenize_examples", "mrope_positions", "image_token_id", "TASKS"]

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
def tokenize_examples(processor, examples: Sequence[Example], *, max_length: int
                      ) -> tuple[list[TokenizedExample], Counter]:
    """Tokenize ``examples`` (order kept); returns the kept ones and the dropped counts by reason.

    Dropped: "too long" (prompt + target + end-of-turn > max_length tokens). Bad input (unknown
    task, unreadable image, prompt without the image placeholder) raises ValueError naming the
    question.
    """
    tokenizer = tokenizer_of(processor)
    eot = end_of_turn_id(processor)
    image_token = image_token_id(processor)
    merge_size = _spatial_merge_size(processor)
    shared_images: dict[str, dict[str, torch.Tensor]] = {}   # path -> image tensors of its first use
    kept: list[TokenizedExample] = []
    dropped: Counter = Counter()
    for index, ex in enumerate(examples):
        who = f"question {ex.question_id or ex.group!r} ({ex.task} example {index})"
        if ex.task not in TASKS:
            raise ValueError(f"{who}: unknown task {ex.task!r} (expected one of {TASKS})")
        images = [load_image(ex.image, who=who)] if ex.image else None
        try:
            encoded = processor(text=[ex.prompt], images=images, return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as err:   # e.g. no image placeholder
            raise ValueError(f"{who}: the processor rejects prompt + image {ex.image!r}: {err}") from err
        prompt_ids = encoded["input_ids"][0]                                     # [P]
        target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        input_ids = torch.cat([prompt_ids, torch.tensor(target_ids + [eot], dtype=torch.long)])  # [L]
        if input_ids.numel() > max_length:
            dropped["too long"] += 1
            continue
        spans = _image_spans(prompt_ids, image_token)
        if bool(ex.image) != bool(spans):
            raise ValueError(f"{who}: the prompt has {len(spans)} image placeholder(s) but "
                             f"{'an image' if ex.image else 'no image'} was given")
        image_inputs: dict[str, torch.Tensor] = {}
        if ex.image:
            image_inputs = shared_images.setdefault(ex.image, {
                k: v for k, v in encoded.items()
                if k in ("pixel_values", "image_grid_thw", "image_sizes")})
        rope = None
        if merge_size is not None:
            rope = mrope_positions(input_ids, image_token, image_inputs.get("image_grid_thw"), merge_size)
        kept.append(TokenizedExample(
            input_ids=input_ids, n_target=len(target_ids) + 1, task=ex.task, group=ex.group,
            index=index, question_id=ex.question_id, image=ex.image, image_inputs=image_inputs,
            image_spans=spans, rope_positions=rope))
    return kept, dropped
