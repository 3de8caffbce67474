"""The packing step: tokenized examples -> model batches + the indices the loss needs.

Two modes (``--packing``):

- ``"none"`` (the baseline): one example per row, right-padded, rows of similar length batched
  together up to ``max_tokens`` token slots (rows x longest row) per batch.
- ``"tree"``: all examples of one group (same image + question) are merged into one token
  **trie**: shared prefixes are stored once, token by token, so an SFT, a refine and two select
  examples that share the image and question — and the refine and select examples, which share
  more — compute that prefix once, and the image appears once per trie (the vision encoder runs
  once per image per step). The trie is laid out depth-first: every branch is a contiguous range
  whose ancestors are ranges before it. Several tries share a row up to ``max_tokens`` (first-fit
  decreasing, no attention across tries); a row is one batch. A group too big for one row is
  split into several tries.

Layout of a trie: sort the group's token sequences lexicographically; then each sequence shares
with the previous one its longest common prefix (LCP) — no earlier sequence shares more — and
only its remaining tokens are appended. The trie's *nodes* are the appended runs, split where a
later sequence branches off, so that every node's ancestors are whole nodes (the form tree
attention wants, see r3v_fast.model.tree_attention).

Positions: a token's position is the one it has in its own sequence (its depth in the trie), so
a branch continues from its parent's last position. For M-RoPE models (Qwen2-VL, Qwen2.5-VL) the
(t, h, w) rows are copied from the example's own rope ids, and the text row that transformers
reads to detect packing is put first: position_ids [4, B, T].

Loss indices: target token j of an example is predicted by the hidden state of the token before
it *on its own path*. In a row that is usually the previous slot, but not at a branch start: the
first token of a branch is predicted by its parent's last token. ``pred_index`` holds that flat
index into the [B*T] hidden states for every target token, so the loss is one gather + the
fused segment op. Identical examples share all their slots but each keeps its own targets.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from r3v_fast.engine.examples import TokenizedExample
from r3v_fast.model.tree_attention import TreeMeta

__all__ = ["PackedBatch", "pack"]


@dataclass(eq=False)
class PackedBatch:
    input_ids: torch.Tensor              # [B, T] int64
    position_ids: torch.Tensor           # [B, T]; M-RoPE: [4, B, T] (tree) or [3, B, T] (none)
    attention_mask: torch.Tensor | None  # [B, T] 1 = token, 0 = padding ("none"); None ("tree")
    tree: TreeMeta | None                # tree attention metadata ("tree")
    image_inputs: dict[str, torch.Tensor]  # pixel_values, image_grid_thw, ... in token order
    pred_index: torch.Tensor             # [N] int64: flat [B*T] index of the state predicting each target
    target_ids: torch.Tensor             # [N] int64
    segment_ids: torch.Tensor            # [N] int64: example slot 0..n_ex-1 of each target token
    example_index: torch.Tensor          # [n_ex] int64: TokenizedExample.index of each slot
    n_target_tokens: torch.Tensor        # [n_ex] int64
    tasks: list[str]                     # [n_ex]
    groups: list[str]                    # [n_ex]
    question_ids: list[str]              # [n_ex]
    n_example_tokens: int = 0            # Σ example lengths: tokens the rows stand for

    @property
    def n_examples(self) -> int:
        return len(self.tasks)

    @property
    def n_slots(self) -> int:
        """Token slots the model computes (rows x row length, padding included)."""
        return int(self.input_ids.numel())

    def _map_tensors(self, fn) -> "PackedBatch":
        """A copy with ``fn`` applied to every tensor (tree metadata and image tensors included)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = fn(value)
            elif isinstance(value, TreeMeta):
                moved[f.name] = TreeMeta(*(fn(t) for t in (value.node_of_token, value.node_start, value.node_end,
                                                          value.node_row, value.ancestor)))
            elif isinstance(value, dict):
                moved[f.name] = {k: fn(v) for k, v in value.items()}
        return replace(self, **moved)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """Page-locked copies of the tensors (the DataLoader's pin_memory thread calls this)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def model_inputs(self) -> dict:
        """Keyword arguments for the HF model (or its base model)."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, **self.image_inputs}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.tree is not None:
            inputs["r3v_tree"] = self.tree
        return inputs


def _concat_images(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-image processor outputs in token order (the model scatters in that order)."""
    if not parts:
        return {}
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if key == "pixel_values" and tensors[0].dim() == 5:   # LLaVA-NeXT: pad the tile dimension
            most = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, most - t.shape[1])) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


def _targets(ex: TokenizedExample, path: torch.Tensor, row_base: int):
    """(pred_index, target_ids) of ``ex`` whose tokens sit at row slots ``path`` [L]."""
    L, n = len(ex), ex.n_target
    if n >= L:
        raise ValueError(f"question {ex.question_id or ex.group!r}: example has an empty prompt")
    return path[L - n - 1: L - 1] + row_base, ex.input_ids[L - n:]


def _finish(exs, input_ids, position_ids, attention_mask, tree, images, preds, targets,
            segments) -> PackedBatch:
    """Assemble a batch; ``exs`` are its examples in segment order."""
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, tree=tree,
        image_inputs=_concat_images(images), pred_index=torch.cat(preds), target_ids=torch.cat(targets),
        segment_ids=torch.cat(segments),
        example_index=torch.tensor([e.index for e in exs], dtype=torch.long),
        n_target_tokens=torch.tensor([e.n_target for e in exs], dtype=torch.long),
        tasks=[e.task for e in exs], groups=[e.group for e in exs],
        question_ids=[e.question_id for e in exs], n_example_tokens=sum(len(e) for e in exs))


def _too_long(ex: TokenizedExample, max_tokens: int) -> ValueError:
    return ValueError(f"question {ex.question_id or ex.group!r}: a {ex.task} example of {len(ex)} "
                      f"tokens does not fit max_tokens={max_tokens}; raise max_tokens or lower max_length")


# ---------------------------------------------------------------------------- "none"
def _pack_none(examples, max_tokens, rng, pad_id) -> list[PackedBatch]:
    order = list(examples)
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=len, reverse=True)   # similar lengths together: little padding (stable: keeps shuffle)
    batches, current = [], []
    for ex in order:
        if len(ex) > max_tokens:
            raise _too_long(ex, max_tokens)
        if current and (len(current) + 1) * len(current[0]) > max_tokens:
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return [_none_batch(b, pad_id) for b in batches]


def _none_batch(exs: list[TokenizedExample], pad_id: int) -> PackedBatch:
    B, T = len(exs), max(len(e) for e in exs)
    mrope = exs[0].rope_positions is not None
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.zeros((3, B, T) if mrope else (B, T), dtype=torch.long)
    preds, targets, segments, images = [], [], [], []
    for r, ex in enumerate(exs):
        L = len(ex)
        input_ids[r, :L] = ex.input_ids
        attention_mask[r, :L] = 1
        if mrope:
            position_ids[:, r, :L] = ex.rope_positions
        else:
            position_ids[r, :L] = torch.arange(L)
        p, t = _targets(ex, torch.arange(L), r * T)
        preds.append(p)
        targets.append(t)
        segments.append(torch.full((ex.n_target,), r, dtype=torch.long))
        images.extend([ex.image_inputs] * len(ex.image_spans))
    return _finish(exs, input_ids, position_ids, attention_mask, None, images, preds, targets, segments)


# ---------------------------------------------------------------------------- "tree"
@dataclass
class _Trie:
    """One trie laid out depth-first, in local slot coordinates."""

    examples: list[TokenizedExample]   # sorted lexicographically
    tokens: torch.Tensor               # [S] int64
    depth: torch.Tensor                # [S] int64: position of the slot in its sequences
    rope: torch.Tensor | None          # [3, S] int64 M-RoPE ids
    paths: list[torch.Tensor]          # per example: [L] slots of its tokens
    node_bounds: list[int]             # node k = slots [bounds[k], bounds[k+1])
    node_parent: list[int]             # parent node of each node (-1: root)
    images: list[tuple[int, dict]]     # (slot of the image's first token, image tensors)

    def __len__(self) -> int:
        return int(self.tokens.numel())


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _split_group(exs: list[TokenizedExample], max_tokens: int) -> list[list[tuple[TokenizedExample, np.ndarray]]]:
    """Sort a group lexicographically and cut it into tries of at most max_tokens slots."""
    seqs = sorted(((e, e.input_ids.numpy()) for e in exs), key=lambda p: tuple(p[1].tolist()))
    tries, current, size, prev = [], [], 0, None
    for ex, seq in seqs:
        if len(seq) > max_tokens:
            raise _too_long(ex, max_tokens)
        new = len(seq) - (_lcp(prev, seq) if current else 0)
        if current and size + new > max_tokens:
            tries.append(current)
            current, size, new = [], 0, len(seq)
        current.append((ex, seq))
        size += new
        prev = seq
    if current:
        tries.append(current)
    return tries


def _build_trie(items: list[tuple[TokenizedExample, np.ndarray]]) -> _Trie:
    tokens, depth, rope, paths, images = [], [], [], [], []
    run_parent: dict[int, int] = {}     # first slot of an appended run -> slot of its parent token
    splits: set[int] = set()            # slots where a later sequence branches off mid-run
    size, prev_path, prev_seq = 0, None, None
    for ex, seq in items:
        L = len(seq)
        lcp = _lcp(prev_seq, seq) if prev_seq is not None else 0
        new = torch.arange(size, size + L - lcp)
        path = new if lcp == 0 else torch.cat([prev_path[:lcp], new])     # [L]
        if L > lcp:
            tokens.append(ex.input_ids[lcp:])
            depth.append(torch.arange(lcp, L))
            if ex.rope_positions is not None:
                rope.append(ex.rope_positions[:, lcp:])
            run_parent[size] = int(prev_path[lcp - 1]) if lcp else -1
            if lcp:
                splits.add(int(prev_path[lcp - 1]) + 1)
            for start, end in ex.image_spans:
                if start < lcp < end:
                    raise ValueError(f"group {ex.group!r}: examples diverge inside the image tokens")
                if start >= lcp:
                    images.append((size + start - lcp, ex.image_inputs))
            size += L - lcp
        paths.append(path)
        prev_path, prev_seq = path, seq
    bounds = sorted(set(run_parent) | (splits - {size})) + [size]
    slot_node = np.zeros(size, dtype=np.int64)
    for k in range(len(bounds) - 1):
        slot_node[bounds[k]:bounds[k + 1]] = k
    parents = []
    for k in range(len(bounds) - 1):
        parent_slot = run_parent.get(bounds[k], bounds[k] - 1)   # mid-run split: previous slot
        parents.append(int(slot_node[parent_slot]) if parent_slot >= 0 else -1)
    return _Trie(examples=[e for e, _ in items], tokens=torch.cat(tokens), depth=torch.cat(depth),
                 rope=torch.cat(rope, dim=1) if rope else None, paths=paths, node_bounds=bounds,
                 node_parent=parents, images=sorted(images, key=lambda im: im[0]))


def _pack_tree(examples, max_tokens, rng) -> list[PackedBatch]:
    groups: dict[str, list[TokenizedExample]] = defaultdict(list)
    for ex in examples:
        groups[ex.group].append(ex)
    tries = []
    for name, exs in groups.items():
        images = {e.image for e in exs}
        if len(images) > 1:
            raise ValueError(f"group {name!r} mixes images {sorted(images)}: a group is one image + question")
        tries.extend(_build_trie(items) for items in _split_group(exs, max_tokens))
    if rng is not None:
        rng.shuffle(tries)
    # First-fit decreasing (stable sort keeps the shuffled order among equal sizes).
    rows: list[list[_Trie]] = []
    room: list[int] = []
    for trie in sorted(tries, key=len, reverse=True):
        slot = next((r for r, free in enumerate(room) if free >= len(trie)), None)
        if slot is None:
            rows.append([])
            room.append(max_tokens)
            slot = len(rows) - 1
        rows[slot].append(trie)
        room[slot] -= len(trie)
    if rng is not None:
        rng.shuffle(rows)
    return [_tree_batch(row) for row in rows]


def _tree_batch(tries: list[_Trie]) -> PackedBatch:
    exs, preds, targets, segments, images = [], [], [], [], []
    node_start, node_end, parent_of = [], [], []
    base = 0
    for trie in tries:
        first_node = len(node_start)
        for k, parent in enumerate(trie.node_parent):
            node_start.append(base + trie.node_bounds[k])
            node_end.append(base + trie.node_bounds[k + 1])
            parent_of.append(first_node + parent if parent >= 0 else -1)
        for ex, path in zip(trie.examples, trie.paths):
            p, t = _targets(ex, path, base)
            preds.append(p)
            targets.append(t)
            segments.append(torch.full((ex.n_target,), len(exs), dtype=torch.long))
            exs.append(ex)
        images.extend(inputs for _, inputs in trie.images)
        base += len(trie)
    T, n_nodes = base, len(node_start)
    ancestor = torch.eye(n_nodes, dtype=torch.bool)                      # [Nn, Nn] ancestor-or-self
    for n, parent in enumerate(parent_of):    # parents precede children in the depth-first layout
        if parent >= 0:
            ancestor[n] |= ancestor[parent]
    starts, ends = torch.tensor(node_start), torch.tensor(node_end)
    node_of_token = torch.repeat_interleave(torch.arange(n_nodes), ends - starts)[None]  # [1, T]
    tree = TreeMeta(node_of_token=node_of_token, node_start=starts, node_end=ends,
                    node_row=torch.zeros(n_nodes, dtype=torch.long), ancestor=ancestor)
    input_ids = torch.cat([t.tokens for t in tries])[None]                              # [1, T]
    depth = torch.cat([t.depth for t in tries])[None]                                   # [1, T]
    if tries[0].rope is not None:   # [text row; t; h; w] x [1, T]
        position_ids = torch.cat([depth, torch.cat([t.rope for t in tries], dim=1)])[:, None]
    else:
        position_ids = depth
    assert input_ids.shape[1] == T
    return _finish(exs, input_ids, position_ids, None, tree, images, preds, targets, segments)


# ---------------------------------------------------------------------------- entry point
def pack(tokenized: Sequence[TokenizedExample], *, mode: str = "tree", max_tokens: int,
         shuffle_seed: int | None = None, pad_id: int = 0) -> list[PackedBatch]:
    """Pack examples into batches of at most ``max_tokens`` token slots.

    mode "tree": one trie per group, several tries per single-row batch; mode "none": padded rows,
    one example each. ``shuffle_seed`` shuffles tries / examples and the batch order (None: a
    deterministic order). ``pad_id`` fills padding slots ("none"; they are masked out).
    Raises ValueError if one example alone exceeds ``max_tokens``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if not tokenized:
        return []
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    if mode == "none":
        return _pack_none(tokenized, max_tokens, rng, pad_id)
    if mode == "tree":
        return _pack_tree(tokenized, max_tokens, rng)
    raise ValueError(f"unknown packing mode {mode!r} (use 'tree' or 'none')")
