"""Paged shared-prefix KV cache: every prefix and every branch in fixed-size blocks of one pool.

The continuous-batching sampler (r3v_fast.engine.shared_sampler, docs/architecture.md,
"Where the time and memory go") keeps a fixed number of decode slots busy: when a branch ends
its slot takes a branch of another question, and when all of a question's branches end its prefix is freed and
a waiting question is prefilled in its place. For that, KV memory must not be one contiguous
buffer per group sized by its longest branch. Here it is a pool of blocks:

    key_pool / value_pool   [NB, Hkv, BS, Dh]   per decoder layer; NB blocks of BS tokens

A question's prefix (image + prompt) is a list of blocks that all its branches read; each
branch (decode slot) has its own list. Block 0 is scratch: positions that must be written but
are never read (padding of a right-padded prefill, slots that hold no branch) go there. Which
block holds which tokens is the sampler's business (host-side free list); the cache only
reads and writes through the block tables it is given. Admission needs no contiguous buffer,
and freeing a branch gives its blocks back at once.

A forward runs in one of three modes, set before the call (like r3v_fast.model.prefix_cache,
whose "r3v_prefix" attention function this cache plugs into through ``attend``):

- ``prefill``: the prompts of newly admitted questions, right-padded. ``update`` scatters each
  token's key/value to its (block, offset) destination; attention is plain causal SDPA (right
  padding needs no mask). The sampler passes the cache as the model's cache argument only, so the
  attention function falls back to SDPA and the vision tower sees no foreign keyword.
- ``extend``: new branches that start with several tokens (the select prompt after the part it
  shares with the CoT prompt), right-padded. Each row attends to the first ``prefix_lens``
  tokens of its question's prefix (gathered from the blocks for this call) and causally to its
  own new tokens; keys/values go to the branch's blocks.
- ``decode``: one token per decode slot, over the first ``n`` slots of fixed-size state
  buffers. ``update`` writes each slot's new key/value at its length; attention is
  ``r3v_fast.ops.paged_cascade_decode_attention`` (each question's prefix blocks read once
  for all its slots, then each slot's own blocks). A decode step only does in-place device
  work on buffers that live as long as the cache, so it can be captured in a CUDA graph and
  replayed: the sampler rewrites the tables between steps, never the buffers' addresses.

Decode state (device tensors, written by the sampler at its host-sync points):

    slot_tables [S, MSB] int32     blocks of each slot's own tokens (zeros: scratch)
    slot_lens [S] int64            tokens each slot holds before this step
    slot_live [S] int64            1 for slots hosting a branch, 0 for empty ones
    question_slots [R, W] int32    slots of each question row (-1 = none)
    prefix_tables [R, MPB] int32, prefix_lens [R] int32

``set_view`` bounds what a decode step reads (question rows, table widths): the sampler keeps
the full sizes when it replays CUDA graphs (fixed shapes) and trims them otherwise, so the
torch backend does not gather unused table columns.

Reference: vLLM's PagedAttention (Kwon et al., SOSP 2023); FlashInfer cascade inference (Ye et
al., 2024); transformers "Attention interface" and "Cache" documentation (v5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from r3v_fast.ops.cascade_attention import paged_cascade_decode_attention

__all__ = ["PagedPrefixCache", "PagedLayer", "SCRATCH_BLOCK"]

SCRATCH_BLOCK = 0   # written, never read: padding tokens and empty slots


class PagedLayer(CacheLayerMixin):
    """One decoder layer's block pool."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.key_pool = torch.zeros(shape, dtype=dtype, device=device)      # [NB, Hkv, BS, Dh]
        self.value_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    # CacheLayerMixin interface: the cache dispatches the modes itself (PagedPrefixCache.update).
    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("PagedLayer is written through PagedPrefixCache.update")

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key_pool, self.value_pool))


class PagedPrefixCache(Cache):
    """Block pools of all decoder layers + the decode state buffers.

    num_blocks x block_size tokens per layer (block 0 is scratch); max_slots decode slots,
    max_rows question rows of max_width slots each; slot_blocks / prefix_blocks: the widths of
    the block tables (blocks a branch / a prefix may hold at most).
    """

    def __init__(self, num_layers: int, *, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, max_slots: int, max_rows: int, max_width: int, slot_blocks: int,
                 prefix_blocks: int, backend: str = "auto"):
        if num_blocks < 2:
            raise ValueError(f"the pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        device = torch.device(device)
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        super().__init__(layers=[PagedLayer(shape, dtype, device) for _ in range(num_layers)])
        self.backend = backend
        self.block_size, self.num_blocks = block_size, num_blocks
        self.mode: str | None = None
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.long, device=device)
        self.slot_tables = torch.zeros(max_slots, max(slot_blocks, 1), **i32)      # [S, MSB]
        self.slot_lens = torch.zeros(max_slots, **i64)                             # [S]
        self.slot_live = torch.zeros(max_slots, **i64)                             # [S] 0 / 1
        self.question_slots = torch.full((max_rows, max_width), -1, **i32)         # [R, W]
        self.prefix_tables = torch.zeros(max_rows, max(prefix_blocks, 1), **i32)   # [R, MPB]
        self.prefix_lens = torch.zeros(max_rows, **i32)                            # [R]
        # Per-step values, recomputed in place by begin_decode.
        self._read_lens = torch.zeros(max_slots, **i32)                            # slot_lens + 1
        self._write_block = torch.zeros(max_slots, **i64)
        self._write_offset = torch.zeros(max_slots, **i64)
        self._slots = 0
        self.num_splits: int | None = None     # key-length splits of the Triton kernel (None: its own rule)
        self.set_view()
        self._write: tuple[torch.Tensor, torch.Tensor] | None = None
        self._extend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------------- bookkeeping
    @property
    def max_slots(self) -> int:
        return self.slot_tables.shape[0]

    def nbytes(self) -> int:
        """Bytes of the block pools (all layers, keys and values)."""
        return sum(layer.nbytes() for layer in self.layers)

    def block_bytes(self) -> int:
        """Bytes one block takes in all layers (keys and values)."""
        return self.nbytes() // self.num_blocks

    def set_view(self, rows: int | None = None, prefix_blocks: int | None = None,
                 slot_blocks: int | None = None) -> None:
        """Read at most ``rows`` question rows and the first ``prefix_blocks`` / ``slot_blocks``
        columns of the tables in decode steps (None = all)."""
        self._view_rows = self.question_slots.shape[0] if rows is None else rows
        self._view_prefix = self.prefix_tables.shape[1] if prefix_blocks is None else max(prefix_blocks, 1)
        self._view_slot = self.slot_tables.shape[1] if slot_blocks is None else max(slot_blocks, 1)

    # ------------------------------------------------------------------------- modes
    def begin_prefill(self, dest_blocks: torch.Tensor, dest_offsets: torch.Tensor) -> None:
        """The next forward holds right-padded prompts [N, P]; token j of row i goes to block
        dest_blocks[i * P + j], offset dest_offsets[i * P + j] (scratch for padding)."""
        self._write = (dest_blocks.long(), dest_offsets.long())
        self.mode = "prefill"

    def begin_extend(self, dest_blocks: torch.Tensor, dest_offsets: torch.Tensor, prefix_tables: torch.Tensor,
                     prefix_lens: torch.Tensor, new_lens: torch.Tensor) -> None:
        """The next forward holds new branch tokens [B, L], right-padded: row b reads the first
        prefix_lens[b] tokens of the prefix in prefix_tables[b] [B, MPB], then its own first
        new_lens[b] tokens causally; token j of row b goes to (dest_blocks, dest_offsets)[b * L + j]."""
        self._write = (dest_blocks.long(), dest_offsets.long())
        self._extend = (prefix_tables.long(), prefix_lens.long(), new_lens.long())
        self.mode = "extend"

    def begin_decode(self, slots: int) -> None:
        """The next forward holds one token for each of the first ``slots`` slots. Device work
        only, in place (no allocation of state, no host sync)."""
        self._slots = slots
        lens = self.slot_lens[:slots]
        column = torch.div(lens, self.block_size, rounding_mode="floor")[:, None]  # [n, 1]
        self._write_block[:slots].copy_(self.slot_tables[:slots].gather(1, column)[:, 0])
        self._write_offset[:slots].copy_(lens % self.block_size)
        self._read_lens[:slots].copy_(lens + 1)                 # the new token is read too
        self.mode = "decode"

    def end_decode(self) -> None:
        """After a decode forward: every slot hosting a branch is one token longer (in place)."""
        self.slot_lens[:self._slots].add_(self.slot_live[:self._slots])
        self.mode = None

    def end_forward(self) -> None:
        """After a prefill or extend forward."""
        self._write = self._extend = None
        self.mode = None

    # ------------------------------------------------------------------------- Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this layer's new keys/values [B, Hkv, L, Dh] where the mode says."""
        layer = self.layers[layer_idx]
        if self.mode in ("prefill", "extend"):
            blocks, offsets = self._write
            rows, heads, length, dim = key_states.shape
            flat = (rows * length, heads, dim)                              # token-major [B*L, Hkv, Dh]
            layer.key_pool[blocks, :, offsets] = key_states.transpose(1, 2).reshape(flat)
            layer.value_pool[blocks, :, offsets] = value_states.transpose(1, 2).reshape(flat)
            return key_states, value_states
        if self.mode == "decode":
            n = self._slots
            blocks, offsets = self._write_block[:n], self._write_offset[:n]
            layer.key_pool[blocks, :, offsets] = key_states[:, :, 0]       # [n, Hkv, Dh]
            layer.value_pool[blocks, :, offsets] = value_states[:, :, 0]
            return key_states, value_states
        raise RuntimeError("PagedPrefixCache: no mode set; call begin_prefill / begin_extend / begin_decode")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    # ------------------------------------------------------------------------- attention
    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Attention of this layer's queries [B, H, L, Dh] in the current mode -> [B, L, H, Dh]."""
        layer = self.layers[layer_idx]
        gqa = query.shape[1] != key.shape[1]
        if self.mode == "prefill":
            out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1,
                                                 scale=scaling, enable_gqa=gqa)
            return out.transpose(1, 2)
        if self.mode == "extend":
            return self._extend_attention(layer, query, key, value, scaling, gqa)
        if self.mode == "decode":
            n, rows = self._slots, self._view_rows
            out = paged_cascade_decode_attention(
                query[:, :, 0], layer.key_pool, layer.value_pool, self.question_slots[:rows],
                self.prefix_tables[:rows, :self._view_prefix], self.prefix_lens[:rows],
                self.slot_tables[:n, :self._view_slot], self._read_lens[:n], scale=scaling,
                num_splits=self.num_splits, backend=self.backend)            # [n, H, Dh]
            return out.unsqueeze(1)                                          # [n, 1, H, Dh]
        raise RuntimeError("PagedPrefixCache: attention called with no mode set")

    def _extend_attention(self, layer, query, key, value, scaling, gqa):
        """query [B, H, L, Dh], key/value [B, Hkv, L, Dh]: each row over its prefix's first
        prefix_lens tokens (gathered from the blocks) and, causally, its own new tokens."""
        tables, prefix_lens, _ = self._extend
        new_len = query.shape[2]

        def gather(pool):   # [NB, Hkv, BS, Dh] -> [B, Hkv, MPB * BS, Dh]
            blocks = pool[tables].movedim(2, 1)                              # [B, Hkv, MPB, BS, Dh]
            return blocks.flatten(2, 3)

        keys = torch.cat([gather(layer.key_pool), key], dim=2)               # [B, Hkv, P + L, Dh]
        values = torch.cat([gather(layer.value_pool), value], dim=2)
        device = query.device
        p_max = keys.shape[2] - new_len
        prefix_ok = torch.arange(p_max, device=device) < prefix_lens[:, None]   # [B, P]
        causal = torch.ones(new_len, new_len, dtype=torch.bool, device=device).tril()  # [L, L]
        mask = torch.cat([prefix_ok[:, None, :].expand(-1, new_len, -1),
                          causal.expand(prefix_ok.shape[0], -1, -1)], dim=2)  # [B, L, P + L]
        if gqa:   # expand KV heads here: SDPA's memory-efficient kernel takes a mask but not GQA
            group = query.shape[1] // keys.shape[1]
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None], scale=scaling)
        return out.transpose(1, 2)                                           # [B, L, H, Dh]
