"""Shared-prefix KV cache and the attention function that reads it ("r3v_prefix").

Shared-prefix sampling (docs/architecture.md, "Where the time and memory go") prefills each image + question once and decodes many
branches from it: K sampled solutions, a greedy one, later the select prompts. This module is
the model side of that: a transformers ``Cache`` subclass that stores each question's prefix
KV **once** and every branch's own KV separately, and an attention function registered with
transformers' ``AttentionInterface`` that reads it. The HF model itself is not modified; the
sampler (r3v_fast.engine.shared_sampler) drives it through its normal forward, passing the
cache both as the model's cache argument (``cache``; ``past_key_values`` before transformers
5.24) and as the keyword ``r3v_prefix`` (extra keywords of a
forward reach the attention function).

Storage, per decoder layer (Q questions in the current layout, K branches each):

    prefix_keys/values  [N, Hkv, P_max, Dh]        one copy per prefilled question (slot n)
    suffix_keys/values  [Q, K, Hkv, S_cap, Dh]     each branch's own tokens
    prefix_index [Q], prefix_lens [Q], suffix_lens [Q, K]   (int64, on the device, shared by layers)

so a question costs P + K * S_cap tokens of KV, not K * (P + L) as with K copies of the
prompt. S_cap grows geometrically as branches get longer, and ``select`` drops finished
branches, so S_cap tracks the longest live branch, not max_new_tokens (the sampler reserves
the whole max_new_tokens up front only when it replays decode steps from a CUDA graph, which
needs fixed buffers: then a question holds at most P + K * L tokens).

A forward runs in one of three modes (set before the call, read by ``update`` and by the
attention function):

- ``prefill``: the prompts of N questions, right-padded to P_max. Keys/values become the
  prefix storage; attention is ordinary causal SDPA. Right padding needs no padding mask:
  a valid token never sees a later (padding) position, and padding positions are never read.
- ``extend``: new branches that start with several tokens (the select prompt after the shared
  prefix), right-padded to S. Each token attends to its question's prefix (prefix_lens keys)
  and causally to the branch's own new tokens: SDPA over [prefix rows ; new keys] with a
  boolean mask. The prefix rows are gathered per layer for this one call (working memory only).
- ``decode``: one token per branch. ``update`` scatters the new key/value into each branch's
  suffix at its own length (no host sync: the positions live on the device) and the attention
  is ``r3v_fast.ops.cascade_decode_attention``: the K branch queries of a question read the
  prefix once as a matrix (Triton on CUDA, the PyTorch reference on the CPU), plus their own
  suffix, merged by log-sum-exp. A decode step only does in-place device work on tensors that
  live as long as the branch layout (lengths, scatter index, int32 copies for the kernel), so
  the sampler can capture it in a CUDA graph and replay it.

In the prefill mode the sampler passes the cache as the model's cache argument only: without the
keyword the attention is the model's plain SDPA, which is what a causal, right-padded
prefill needs, and ``update`` still stores the prefix.

Without the ``r3v_prefix`` keyword the attention function is plain SDPA, so a model switched
to "r3v_prefix" still serves ``generate``, training and scoring unchanged. No mask function is
registered for "r3v_prefix": transformers then builds no mask at all (it skips mask creation
for attention implementations without one), which is what all three modes want.

Positions are the caller's business (position_ids go to the forward): each branch continues
from its question's prefix, for Qwen2-VL M-RoPE at the prefix's next text position.
Reference: FlashInfer cascade inference (Ye et al., 2024); transformers "Attention interface"
and "Cache" documentation (v5).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from r3v_fast.model.loading import restore_decoder_attention, set_decoder_attention
from r3v_fast.ops.cascade_attention import cascade_decode_attention

__all__ = ["ATTENTION_NAME", "SharedPrefixCache", "SharedPrefixLayer", "prefix_attention_forward",
           "register_prefix_attention", "prefix_attention_enabled"]

ATTENTION_NAME = "r3v_prefix"
MODES = ("prefill", "extend", "decode")


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class SharedPrefixLayer(CacheLayerMixin):
    """One decoder layer's storage: the prefix pool and the branch (suffix) buffers."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.prefix_keys: torch.Tensor | None = None     # [N, Hkv, P_max, Dh]
        self.prefix_values: torch.Tensor | None = None
        self.suffix_keys: torch.Tensor | None = None     # [Q, K, Hkv, S_cap, Dh]
        self.suffix_values: torch.Tensor | None = None

    # CacheLayerMixin interface: the cache dispatches modes itself (SharedPrefixCache.update).
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("SharedPrefixLayer is written through SharedPrefixCache.update")

    def get_seq_length(self) -> int:
        prefix = 0 if self.prefix_keys is None else self.prefix_keys.shape[2]
        suffix = 0 if self.suffix_keys is None else self.suffix_keys.shape[3]
        return prefix + suffix

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return _nbytes(self.prefix_keys, self.prefix_values, self.suffix_keys, self.suffix_values)


class SharedPrefixCache(Cache):
    """Prefix KV once per question + per-branch suffix KV, for all decoder layers.

    Life cycle (driven by r3v_fast.engine.shared_sampler):
        cache = SharedPrefixCache(num_layers)
        cache.begin_prefill()                         ; forward(prompts)   -> prefix slots 0..N-1
        cache.begin_branches(prefix_index, prefix_lens, num_branches, capacity)
        [cache.begin_extend(q_start, q_end, new_lens) ; forward(new branch tokens)]
        loop: cache.ensure_capacity(n); cache.begin_decode(); forward(one token per branch)
              cache.select(keep_questions, keep_branches)   # drop finished branches
        cache.end_branches()                          # next phase reuses the prefixes
    ``peak_bytes`` is the most KV memory the cache has held (prefix + branch buffers).
    """

    def __init__(self, num_layers: int, *, backend: str = "auto"):
        super().__init__(layers=[SharedPrefixLayer() for _ in range(num_layers)])
        self.backend = backend
        self.mode: str | None = None
        self.prefix_index: torch.Tensor | None = None    # [Q] int64: prefix slot of each question row
        self.prefix_lens: torch.Tensor | None = None     # [Q] int64: prefix tokens each row reads
        self.suffix_lens: torch.Tensor | None = None     # [Q, K] int64: tokens in each branch
        self.capacity = 0                                # S_cap of the branch buffers
        self.peak_bytes = 0
        # Decode-step state, allocated once per branch layout and updated in place, so that a
        # step has fixed tensor addresses (it can be replayed from a CUDA graph):
        self._write_index: torch.Tensor | None = None    # [Q, K, Hkv, 1, Dh] view of suffix_lens
        self._read_lens: torch.Tensor | None = None      # [Q, K] int32: suffix_lens + 1
        self._prefix_lens_i32: torch.Tensor | None = None   # int32 copies for the kernel
        self._prefix_index_i32: torch.Tensor | None = None
        self._extend: tuple[int, int, torch.Tensor] | None = None

    # ------------------------------------------------------------------------- bookkeeping
    def nbytes(self) -> int:
        """KV bytes held now (prefix pool + branch buffers, all layers)."""
        return sum(layer.nbytes() for layer in self.layers)

    def _track_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    @property
    def num_questions(self) -> int:
        return 0 if self.suffix_lens is None else self.suffix_lens.shape[0]

    @property
    def num_branches(self) -> int:
        return 0 if self.suffix_lens is None else self.suffix_lens.shape[1]

    def _prefix_layer(self) -> SharedPrefixLayer:
        layer = self.layers[0]
        if layer.prefix_keys is None:
            raise RuntimeError("SharedPrefixCache: no prefix yet; run a prefill forward first")
        return layer

    # ------------------------------------------------------------------------- modes
    def begin_prefill(self) -> None:
        """The next forward holds the prompts (right-padded); they become the prefix slots."""
        if self.layers[0].prefix_keys is not None:
            raise RuntimeError("SharedPrefixCache: the prefix is already filled; use a new cache")
        self.mode = "prefill"

    def begin_branches(self, prefix_index: torch.Tensor, prefix_lens: torch.Tensor, num_branches: int,
                       capacity: int = 0) -> None:
        """Start a set of empty branches: ``num_branches`` per question row.

        prefix_index [Q] (slot each row reads), prefix_lens [Q] (how many of the slot's tokens
        the row attends to: the prompt length, or a shorter shared part of it). ``capacity``
        preallocates that many suffix tokens per branch (it grows on demand anyway).
        """
        layer = self._prefix_layer()
        num_q = prefix_index.shape[0]
        if tuple(prefix_lens.shape) != (num_q,):
            raise ValueError(f"prefix_lens shape {tuple(prefix_lens.shape)} != prefix_index shape ({num_q},)")
        device = layer.prefix_keys.device
        self.prefix_index = prefix_index.to(device=device, dtype=torch.long)
        self.prefix_lens = prefix_lens.to(device=device, dtype=torch.long)
        self.suffix_lens = torch.zeros(num_q, num_branches, dtype=torch.long, device=device)
        _, num_kv_heads, _, head_dim = layer.prefix_keys.shape
        shape = (num_q, num_branches, num_kv_heads, max(int(capacity), 1), head_dim)
        for layer in self.layers:
            dtype = layer.prefix_keys.dtype
            layer.suffix_keys = torch.empty(shape, dtype=dtype, device=device)
            layer.suffix_values = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = shape[3]
        self.mode = None
        self._new_layout()
        self._track_peak()

    def _new_layout(self) -> None:
        """(Re)build the per-layout decode state after begin_branches or select."""
        num_q, num_b = self.suffix_lens.shape
        _, num_kv_heads, _, head_dim = self._prefix_layer().prefix_keys.shape
        # Where each branch's next token goes: a view, so it follows suffix_lens in place.
        self._write_index = self.suffix_lens.view(num_q, num_b, 1, 1, 1).expand(
            num_q, num_b, num_kv_heads, 1, head_dim)
        self._read_lens = torch.empty(num_q, num_b, dtype=torch.int32, device=self.suffix_lens.device)
        self._prefix_lens_i32 = self.prefix_lens.to(torch.int32)
        self._prefix_index_i32 = self.prefix_index.to(torch.int32)

    def end_branches(self) -> None:
        """Free the branch buffers; the prefix slots stay for the next set of branches."""
        for layer in self.layers:
            layer.suffix_keys = layer.suffix_values = None
        self.prefix_index = self.prefix_lens = self.suffix_lens = None
        self._write_index = self._read_lens = self._extend = None
        self._prefix_lens_i32 = self._prefix_index_i32 = None
        self.capacity, self.mode = 0, None

    def ensure_capacity(self, tokens: int, *, limit: int | None = None) -> None:
        """Make every branch buffer hold at least ``tokens`` tokens (grow x2, capped by limit)."""
        if tokens <= self.capacity:
            return
        new_capacity = max(tokens, 2 * self.capacity)
        if limit is not None:
            new_capacity = max(tokens, min(new_capacity, limit))
        for layer in self.layers:
            for name in ("suffix_keys", "suffix_values"):
                old = getattr(layer, name)
                new = old.new_empty(*old.shape[:3], new_capacity, old.shape[4])
                new[:, :, :, :self.capacity].copy_(old[:, :, :, :self.capacity])
                setattr(layer, name, new)
                del old
        self.capacity = new_capacity
        self._track_peak()

    def select(self, questions: torch.Tensor, branches: torch.Tensor) -> None:
        """Keep question rows ``questions`` [Q'] and, of each, branches ``branches`` [Q', K']
        (indices into the current layout; a branch may be repeated as padding). Copies the
        kept branch buffers into new, smaller ones and frees the old."""
        device = self.suffix_lens.device
        questions = questions.to(device=device, dtype=torch.long)
        branches = branches.to(device=device, dtype=torch.long)
        rows = questions[:, None]                                           # [Q', 1]
        for layer in self.layers:
            layer.suffix_keys = layer.suffix_keys[rows, branches]           # [Q', K', Hkv, S_cap, Dh]
            layer.suffix_values = layer.suffix_values[rows, branches]
        self.suffix_lens = self.suffix_lens[rows, branches]
        self.prefix_index = self.prefix_index[questions]
        self.prefix_lens = self.prefix_lens[questions]
        self._new_layout()

    def begin_extend(self, q_start: int, q_end: int, new_lens: torch.Tensor) -> None:
        """The next forward holds new tokens of every branch of question rows [q_start, q_end):
        input rows (q_end - q_start) * K, right-padded; new_lens [q_end - q_start, K] of them
        are real. The branches must be empty; their suffix lengths become new_lens."""
        if self.suffix_lens is None:
            raise RuntimeError("SharedPrefixCache: begin_branches before begin_extend")
        new_lens = new_lens.to(device=self.suffix_lens.device, dtype=torch.long)
        if tuple(new_lens.shape) != (q_end - q_start, self.num_branches):
            raise ValueError(f"new_lens shape {tuple(new_lens.shape)} != ({q_end - q_start}, {self.num_branches})")
        self._extend = (q_start, q_end, new_lens)
        self.suffix_lens[q_start:q_end] = new_lens
        self.mode = "extend"

    def begin_decode(self) -> None:
        """The next forward holds one token per branch ([Q * K, 1] input rows, question-major).
        Device work only, in place (no allocation, no host sync)."""
        if self.suffix_lens is None:
            raise RuntimeError("SharedPrefixCache: begin_branches before begin_decode")
        self._read_lens.copy_(self.suffix_lens).add_(1)       # the new token is read too
        self.mode = "decode"

    def end_decode(self) -> None:
        """After a decode forward: every branch is one token longer (in place)."""
        self.suffix_lens.add_(1)
        self.mode = None

    # ------------------------------------------------------------------------- Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this layer's new keys/values [B, Hkv, L, Dh] according to the mode."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if self.mode == "prefill":
            # Contiguous [N, Hkv, P, Dh]: each (slot, head) prefix is one dense block to stream.
            layer.prefix_keys, layer.prefix_values = key_states.contiguous(), value_states.contiguous()
            if layer_idx == len(self.layers) - 1:
                self._track_peak()
            return layer.prefix_keys, layer.prefix_values
        if self.mode == "extend":
            q_start, q_end, _ = self._extend
            num_q, num_b = q_end - q_start, self.num_branches
            new_len = key_states.shape[2]
            if new_len > self.capacity:
                raise RuntimeError(f"SharedPrefixCache: {new_len} new tokens exceed the branch capacity "
                                   f"{self.capacity}; call ensure_capacity first")
            view = (num_q, num_b, *key_states.shape[1:])                    # [q, K, Hkv, S, Dh]
            layer.suffix_keys[q_start:q_end, :, :, :new_len] = key_states.view(view)
            layer.suffix_values[q_start:q_end, :, :, :new_len] = value_states.view(view)
            return key_states, value_states
        if self.mode == "decode":
            num_q, num_b = self.suffix_lens.shape
            view = (num_q, num_b, key_states.shape[1], 1, key_states.shape[3])  # [Q, K, Hkv, 1, Dh]
            layer.suffix_keys.scatter_(3, self._write_index, key_states.reshape(view))
            layer.suffix_values.scatter_(3, self._write_index, value_states.reshape(view))
            return key_states, value_states
        raise RuntimeError("SharedPrefixCache: no mode set; call begin_prefill / begin_extend / begin_decode")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx]
        prefix = 0 if layer.prefix_keys is None else layer.prefix_keys.shape[2]
        longest = 0 if self.suffix_lens is None or self.suffix_lens.numel() == 0 else self.capacity
        return prefix + longest

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
            num_q, num_b = self.suffix_lens.shape
            q = query.view(num_q, num_b, query.shape[1], query.shape[3])     # [Q, K, H, Dh] (L = 1)
            out = cascade_decode_attention(
                q, layer.prefix_keys, layer.prefix_values, self._prefix_lens_i32,
                layer.suffix_keys, layer.suffix_values, self._read_lens,
                scale=scaling, prefix_index=self._prefix_index_i32, backend=self.backend)
            return out.view(num_q * num_b, 1, query.shape[1], query.shape[3])   # [B, 1, H, Dh]
        raise RuntimeError("SharedPrefixCache: attention called with no mode set")

    def _extend_attention(self, layer, query, key, value, scaling, gqa):
        """New branch tokens: each sees its question's prefix (prefix_lens keys) and, causally,
        its own new tokens. query [R, H, S, Dh], key/value [R, Hkv, S, Dh], R = rows * K."""
        q_start, q_end, new_lens = self._extend
        num_b, new_len = self.num_branches, query.shape[2]
        slots = self.prefix_index[q_start:q_end]                             # [q]
        p_max = layer.prefix_keys.shape[2]

        def rows_of(prefix):   # [N, Hkv, P, Dh] -> [q * K, Hkv, P, Dh], one copy per branch row
            picked = prefix[slots]                                            # [q, Hkv, P, Dh]
            return picked.unsqueeze(1).expand(-1, num_b, *picked.shape[1:]).flatten(0, 1)

        keys = torch.cat([rows_of(layer.prefix_keys), key], dim=2)          # [R, Hkv, P + S, Dh]
        values = torch.cat([rows_of(layer.prefix_values), value], dim=2)
        device = query.device
        prefix_ok = (torch.arange(p_max, device=device)
                     < self.prefix_lens[q_start:q_end, None])                # [q, P]
        prefix_ok = prefix_ok.repeat_interleave(num_b, dim=0)                # [R, P]
        causal = torch.ones(new_len, new_len, dtype=torch.bool, device=device).tril()  # [S, S]
        mask = torch.cat([prefix_ok[:, None, :].expand(-1, new_len, -1),
                          causal.expand(prefix_ok.shape[0], -1, -1)], dim=2)  # [R, S, P + S]
        if gqa:   # expand KV heads here: SDPA's memory-efficient kernel takes a mask but not GQA
            group = query.shape[1] // keys.shape[1]
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None],
                                             scale=scaling)                  # [R, H, S, Dh]
        return out.transpose(1, 2)


# ---------------------------------------------------------------------------- attention function
def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             r3v_prefix: SharedPrefixCache | None = None, **kwargs):
    """transformers attention function "r3v_prefix". query [B, H, L, Dh], key/value [B, Hkv, L', Dh]
    -> ([B, L, H, Dh], None). Plain SDPA unless a cache comes as ``r3v_prefix``: this module's
    SharedPrefixCache or the block-pool PagedPrefixCache (r3v_fast.model.paged_cache); either
    answers ``attend(layer_idx, query, key, value, scaling)``."""
    if r3v_prefix is None or not getattr(module, "is_causal", True):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("shared-prefix attention does not implement sliding-window layers")
    return r3v_prefix.attend(module.layer_idx, query, key, value, scaling), None


def register_prefix_attention() -> None:
    """Register "r3v_prefix" with transformers' AttentionInterface (idempotent). No mask function
    is registered on purpose: transformers then builds no attention mask for this implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_attention_forward)


@contextlib.contextmanager
def prefix_attention_enabled(model):
    """Switch the text decoder of an HF VLM (or its peft wrapper) to "r3v_prefix" for the block,
    then back to whatever it used before (e.g. "sdpa" or "r3v_tree"). The vision tower keeps its
    own attention."""
    register_prefix_attention()
    previous = set_decoder_attention(model, ATTENTION_NAME, "shared-prefix attention")
    try:
        yield
    finally:
        restore_decoder_attention(model, previous)
