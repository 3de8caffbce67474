"""Tree attention: every token of a packed token trie attends exactly to its ancestors.

Tree packing (r3v_fast.engine.packing) lays each trie out depth-first, so a trie is a set of
*nodes* — contiguous token ranges — whose ancestors are whole nodes placed before them. Token q
of node n may attend to key k iff k's node is n or an ancestor of n, and k <= q:

    allowed[q, k] = ancestor[node(q), node(k)] and k <= q          (ancestor-or-self matrix)

Tries in one row have no common ancestor, so no attention crosses tries.

This plugs into transformers through its own seam: ``AttentionInterface.register("r3v_tree")``.
The language model's attention is switched to "r3v_tree" (the vision tower keeps its own); the
tree metadata (:class:`TreeMeta`) reaches the attention function as the keyword ``r3v_tree``
passed through ``model(**inputs, r3v_tree=meta)``. Without that keyword the function is plain
SDPA, so the same model still serves padded batches and ``generate``. A matching mask function
is registered under the same name: it skips building any mask when there is no 2-D padding mask
and no cache (tree batches carry their own mask; plain unpadded calls are causal), and otherwise
builds the ordinary SDPA mask. (The one thing given up: transformers' detection of packed
sequences from position ids, which tree batches replace.)

Backends:
- CPU (and the reference): SDPA with the boolean ancestor mask, trie by trie (the dense
  [T, T] mask is block-diagonal over tries; one trie at a time costs Σ size² instead of T²).
- CUDA: FlexAttention with a BlockMask built straight from the node ranges — per (query, key
  block) counts of allowed keys from range overlaps, O(T·T/128), instead of create_block_mask
  evaluating the mask on all T² pairs. Partial blocks use the mask_mod above.

References: FlexAttention (Dong et al., 2024, arXiv 2412.05496); tree attention for shared
prefixes as in SpecInfer / Medusa tree verification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from r3v_fast.model.loading import set_decoder_attention

__all__ = ["TreeMeta", "ATTENTION_NAME", "tree_attention_forward", "register_tree_attention",
           "enable_tree_attention"]

ATTENTION_NAME = "r3v_tree"
FLEX_BLOCK_SIZE = 128


@dataclass(eq=False)
class TreeMeta:
    """Tree layout of one packed batch (node ids are global over the batch's rows)."""

    node_of_token: torch.Tensor  # [B, T] int64: node of each token
    node_start: torch.Tensor     # [Nn] int64: first row position of each node
    node_end: torch.Tensor       # [Nn] int64: one past its last position
    node_row: torch.Tensor       # [Nn] int64: row of each node
    ancestor: torch.Tensor       # [Nn, Nn] bool: ancestor[n, m] = m is n or an ancestor of n
    _cache: dict = field(default_factory=dict, repr=False)   # masks built once, shared by all layers

    def to(self, device) -> "TreeMeta":
        return TreeMeta(*(t.to(device) for t in (self.node_of_token, self.node_start, self.node_end,
                                                 self.node_row, self.ancestor)))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.node_of_token.shape)

    def dense_mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool: the attention pattern, materialized (CPU path and tests)."""
        if "dense" not in self._cache:
            node = self.node_of_token                                   # [B, T]
            T = node.shape[1]
            same_tree = self.ancestor[node[:, :, None], node[:, None, :]]  # [B, T, T]
            causal = torch.ones(T, T, dtype=torch.bool, device=node.device).tril()
            self._cache["dense"] = (same_tree & causal).unsqueeze(1)
        return self._cache["dense"]

    def trie_blocks(self) -> list[tuple[int, int, int, torch.Tensor]]:
        """(row, start, end, mask [end-start, end-start] bool) of every trie: the dense mask's
        diagonal blocks. Nothing crosses tries, so attention per trie is exact and costs
        Σ size² instead of T² (the CPU path)."""
        if "tries" not in self._cache:
            node = self.node_of_token                                   # [B, T]
            # A node's root is its first ancestor in the layout (ancestors precede descendants).
            root = self.ancestor.to(torch.int8).argmax(dim=1)           # [Nn]
            blocks = []
            for row in range(node.shape[0]):
                trie_of_slot = root[node[row]]                           # [T]
                ends = (torch.diff(trie_of_slot).nonzero().flatten() + 1).tolist() + [node.shape[1]]
                start = 0
                for end in ends:
                    local = node[row, start:end]
                    causal = torch.ones(end - start, end - start, dtype=torch.bool, device=node.device).tril()
                    blocks.append((row, start, end, self.ancestor[local[:, None], local[None, :]] & causal))
                    start = end
            self._cache["tries"] = blocks
        return self._cache["tries"]

    def block_classes(self, block_size: int = FLEX_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
        """(partial, full): [B, nq, nk] bool block classes, computed from the node ranges.

        For query q in node n and key block j, the allowed keys number
            cover[n, j] + |[start(n), q] ∩ block j|,   cover = strict_ancestor @ overlap,
        where overlap[m, j] = |range(m) ∩ block j|. A block pair is full when every query of the
        q block sees all keys of block j, empty when none sees any.
        """
        node = self.node_of_token                                       # [B, T]
        B, T = node.shape
        nb = math.ceil(T / block_size)
        dev = node.device
        blk_lo = torch.arange(nb, device=dev) * block_size              # [nb]
        blk_hi = (blk_lo + block_size).clamp(max=T)                     # [nb]
        # Counts stay below 2^24, so fp32 matmul and sums are exact.
        overlap = (torch.minimum(self.node_end[:, None], blk_hi) -
                   torch.maximum(self.node_start[:, None], blk_lo)).clamp(min=0).float()  # [Nn, nb]
        strict = self.ancestor & ~torch.eye(len(self.ancestor), dtype=torch.bool, device=dev)
        cover = strict.float() @ overlap                                # [Nn, nb]
        q = torch.arange(T, device=dev)                                 # [T]
        own = (torch.minimum(q[:, None] + 1, blk_hi) -
               torch.maximum(self.node_start[node][..., None], blk_lo)).clamp(min=0)  # [B, T, nb]
        allowed = cover[node] + own                                     # [B, T, nb]
        pad = nb * block_size - T   # missing queries of the last block must not decide min / max
        lo = F.pad(allowed, (0, 0, 0, pad), value=float("inf")).view(B, nb, block_size, nb).amin(2)
        hi = F.pad(allowed, (0, 0, 0, pad), value=0.0).view(B, nb, block_size, nb).amax(2)
        full = lo == (blk_hi - blk_lo).float()                          # [B, nq, nk]
        partial = (hi > 0) & ~full
        return partial, full

    def block_mask(self, block_size: int = FLEX_BLOCK_SIZE):
        """FlexAttention BlockMask of the tree, built from the node ranges (see block_classes)."""
        key = ("block", block_size)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import BlockMask

            partial, full = self.block_classes(block_size)
            B, T = self.node_of_token.shape
            nb = partial.shape[-1]
            # Pad node ids to whole blocks with a sentinel node that sees nothing, so that the
            # mask_mod never indexes past the row, whatever the kernel does with the tail.
            sentinel = len(self.ancestor)
            node = F.pad(self.node_of_token, (0, nb * block_size - T), value=sentinel)  # [B, nb*bs]
            ancestor = F.pad(self.ancestor, (0, 1, 0, 1), value=False)                 # [Nn+1, Nn+1]

            def mask_mod(b, h, q_idx, kv_idx):
                return ancestor[node[b, q_idx], node[b, kv_idx]] & (kv_idx <= q_idx)

            def as_indices(classes):   # [B, nq, nk] bool -> counts [B, 1, nq], indices [B, 1, nq, nk]
                counts = classes.sum(-1, dtype=torch.int32)
                order = torch.argsort((~classes).to(torch.int8), dim=-1, stable=True).to(torch.int32)
                return counts[:, None], order[:, None]

            self._cache[key] = BlockMask.from_kv_blocks(
                *as_indices(partial), *as_indices(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                seq_lengths=(T, T))
        return self._cache[key]


# ---------------------------------------------------------------------------- attention function
_compiled_flex = None


def _flex_attention(query, key, value, block_mask, scaling):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:   # compiled once per process; shapes change per batch (automatic dynamic)
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scaling,
                          enable_gqa=query.shape[1] != key.shape[1])


def tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           r3v_tree: TreeMeta | None = None, **kwargs):
    """transformers attention function. query [B, Hq, T, D], key/value [B, Hkv, T, D] ->
    ([B, T, Hq, D], None). Plain SDPA unless tree metadata is given to a causal layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if r3v_tree is None or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("tree attention does not implement sliding-window layers")
    if key.shape[2] != query.shape[2] or tuple(r3v_tree.shape) != (query.shape[0], query.shape[2]):
        raise ValueError(f"tree metadata of shape {tuple(r3v_tree.shape)} does not match the layer "
                         f"input (batch {query.shape[0]}, {query.shape[2]} queries, {key.shape[2]} keys)")
    if query.device.type == "cuda":
        if dropout:
            raise ValueError("tree attention on CUDA (FlexAttention) has no attention dropout")
        out = _flex_attention(query, key, value, r3v_tree.block_mask(), scaling)
    else:   # SDPA with the boolean ancestor mask, one trie at a time
        blocks = r3v_tree.trie_blocks()
        rows = []
        for row in range(query.shape[0]):
            mine = [(end - start, mask) for r, start, end, mask in blocks if r == row]
            sizes = [size for size, _ in mine]
            # split (not slicing per trie): its backward is one cat, not a zero-filled row per trie
            parts = zip(*(t[row:row + 1].split(sizes, dim=2) for t in (query, key, value)), mine)
            rows.append(torch.cat([F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1]) for q, k, v, (_, mask) in parts], dim=2))
        out = torch.cat(rows)                                           # [B, Hq, T, D]
    return out.transpose(1, 2).contiguous(), None                      # [B, T, Hq, D]


def _tree_mask(*args, **kwargs):
    """Mask function for "r3v_tree": none for tree batches, the SDPA mask otherwise.

    No mask is built when there is no 2-D padding mask and no cache (keys == queries, no offset):
    a tree batch brings its own, a plain unpadded call is causal. Keyword names differ across
    transformers 5 releases (q_length, or cache_position in older ones); all are passed through.
    """
    from transformers.masking_utils import sdpa_mask

    cache_position = kwargs.get("cache_position")
    q_length = kwargs.get("q_length", None if cache_position is None else cache_position.shape[0])
    if kwargs.get("attention_mask") is None and kwargs.get("kv_length") == q_length and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(*args, **kwargs)


def register_tree_attention() -> None:
    """Register "r3v_tree" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _tree_mask)


def enable_tree_attention(model) -> None:
    """Switch the language model of an HF VLM (or its peft wrapper) to "r3v_tree" attention.

    Only the text decoder changes; the vision tower keeps its implementation. Without tree
    metadata the decoder behaves exactly as with "sdpa".
    """
    register_tree_attention()
    set_decoder_attention(model, ATTENTION_NAME, "tree attention")
