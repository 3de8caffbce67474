"""Per-example target log-likelihoods of a VLM, without ever forming full logits.

:class:`TargetLogprobs` is the one loss-side function of the trainer: given a
:class:`~r3v_fast.engine.packing.PackedBatch` (padded rows or tree-packed tries) it runs the
model's backbone to its final hidden states, gathers the state that predicts each target token
(``pred_index``), and reduces ``log p(target)`` per example with the fused segment op
``r3v_fast.ops.segment_logprob`` (LM-head matmul + log-softmax + gather + per-segment sum in
one pass; the [tokens x vocab] logits are never stored). It is an ``nn.Module`` so that
accelerate can wrap it in DDP / FSDP and the trainer's ``wrapper(batch)`` call goes through the
top-level forward (gradient-sync hooks fire).

:func:`sequence_logprobs` is the public one-call version: examples in, one summed target
log-probability per example out. It respects the caller's grad mode: wrap it in
``torch.no_grad()`` to rescore, leave grad on for DPO-style objectives.
"""

from __future__ import annotations

from typing import Sequence

import torch

from r3v_fast.engine.examples import Example, tokenize_examples
from r3v_fast.engine.packing import PackedBatch, pack
from r3v_fast.model.loading import lm_head_and_backbone, pad_id, unwrap_peft
from r3v_fast.model.tree_attention import ATTENTION_NAME, enable_tree_attention
from r3v_fast.ops import segment_logprob, weighted_nll

__all__ = ["TargetLogprobs", "sequence_logprobs", "LOSSES"]

LOSSES = ("fused", "naive")


def naive_segment_logprob(hidden: torch.Tensor, lm_head: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The baseline the fused op replaces, as a plain causal-LM trainer computes it: logits for
    every position through ``lm_head``, upcast to fp32, log-softmax, then the target gather and
    the per-example sums. [n_ex] float32. Holds [B, T, V] logits (and their fp32 copy)."""
    logits = lm_head(hidden).float()                                              # [B, T, V]
    logp = logits.log_softmax(-1).reshape(-1, logits.shape[-1])                   # [B*T, V]
    per_token = logp[batch.pred_index, batch.target_ids]                          # [N]
    return per_token.new_zeros(batch.n_examples).index_add(0, batch.segment_ids, per_token)  # [n_ex]


class TargetLogprobs(torch.nn.Module):
    """forward(batch) -> (logp_sum [n_ex] float32, n_tokens [n_ex] int64).

    Wraps an HF VLM (or its peft wrapper) as ``self.model``. The language model's attention is
    switched to "r3v_tree" (plain SDPA unless a batch carries tree metadata; see
    r3v_fast.model.tree_attention), once, here. ``loss`` "fused" (the default) reduces with the
    fused op and never stores logits; "naive" is the full-logits baseline
    (:func:`naive_segment_logprob`), kept for equivalence tests and benchmarks.
    """

    def __init__(self, model, loss: str = "fused"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r} (use one of {LOSSES})")
        self.loss = loss
        self.model = model
        enable_tree_attention(model)
        lm_head_and_backbone(model)   # fail early on a model without the expected structure
        base = unwrap_peft(model)
        self._text_config = base.config.get_text_config()

    def forward(self, batch: PackedBatch, example_weights: torch.Tensor | None = None):
        """``(logp [n_ex], n_tokens [n_ex])``; with ``example_weights`` [n_ex] (the trainer's
        loss weights, known before the forward) ``(loss, logp [n_ex] detached, n_tokens)`` where
        loss = -Σ_ex w_ex · logp_ex. The fused path then runs ``weighted_nll``, which forms the
        LM-head gradients during the forward (three products instead of four, two with a frozen
        head); logp comes along for the per-task logs."""
        # Looked up per call rather than stored: a second reference to lm_head would register it
        # twice (duplicate state-dict keys, shared modules under FSDP).
        lm_head, backbone = lm_head_and_backbone(self.model)
        if batch.tree is not None and self._text_config._attn_implementation != ATTENTION_NAME:
            enable_tree_attention(self.model)   # switched away meanwhile (e.g. by a sampler)
        hidden = backbone(**batch.model_inputs())                           # [B, T, D]
        if self.loss == "naive":
            logp = naive_segment_logprob(hidden, lm_head, batch)               # [n_ex]
            if example_weights is None:
                return logp, batch.n_target_tokens
            return -(example_weights * logp).sum(), logp.detach(), batch.n_target_tokens
        states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.pred_index)  # [N, D]
        bias = getattr(lm_head, "bias", None)
        if example_weights is None:
            logp = segment_logprob(states, lm_head.weight, batch.target_ids, batch.segment_ids,
                                   batch.n_examples, bias=bias)                # [n_ex]
            return logp, batch.n_target_tokens
        token_weights = example_weights.to(torch.float32)[batch.segment_ids]    # [N]
        loss, logp = weighted_nll(states, lm_head.weight, batch.target_ids, token_weights, bias=bias,
                                  return_logprobs=True, segment_ids=batch.segment_ids,
                                  num_segments=batch.n_examples)               # [], [n_ex]
        return loss, logp, batch.n_target_tokens


def sequence_logprobs(model, processor, examples: Sequence[Example], packing: str = "tree",
                      max_tokens: int = 8192) -> torch.Tensor:
    """Summed target-token log-probability of each example: Tensor[len(examples)] float32.

    The target is ``example.target`` followed by the end-of-turn token, given the rendered
    prompt and the image. ``packing`` "tree" shares each group's common prefix; "none" runs
    padded rows. Raises ValueError if an example alone is longer than ``max_tokens``.
    """
    if packing not in ("tree", "none"):
        raise ValueError(f"unknown packing {packing!r} (use 'tree' or 'none')")
    tokenized, dropped = tokenize_examples(processor, examples, max_length=max_tokens)
    if dropped:
        kept = {t.index for t in tokenized}
        too_long = [examples[i].question_id or examples[i].group for i in range(len(examples)) if i not in kept]
        raise ValueError(f"{len(too_long)} example(s) longer than max_tokens={max_tokens}: questions "
                         f"{too_long[:5]}{' ...' if len(too_long) > 5 else ''}")
    wrapper = TargetLogprobs(model)
    device = next(model.parameters()).device
    parts = []
    for batch in pack(tokenized, mode=packing, max_tokens=max_tokens, pad_id=pad_id(processor)):
        logp, _ = wrapper(batch.to(device))
        parts.append((batch.example_index.to(device), logp))
    out = torch.zeros(len(examples), dtype=torch.float32, device=device)
    if parts:   # scatter back to input order; index_put keeps the graph for gradients
        index = torch.cat([i for i, _ in parts])
        out = out.index_put((index,), torch.cat([lp for _, lp in parts]))
    return out
