"""Drop the fused log-likelihood into any transformers causal LM or VLM: ``apply_fused_loss``.

    model = AutoModelForCausalLM.from_pretrained(...)      # or Qwen2-VL, Qwen2.5-VL, LLaVA, ...
    apply_fused_loss(model)                                 # one line; Trainer / SFTTrainer as usual
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss, out.logits is None

With ``labels`` the patched forward runs the model's own forward with the LM head turned into
the identity for the duration of the call, so the model returns its final hidden states where
the logits would be; the loss is then ``r3v_fast.ops.weighted_nll`` on those states and the
head's weight (and bias). The [tokens x vocab] logits are never formed, in forward or backward.
The loss is HF's default causal-LM loss: labels shifted left by one, ``ignore_index`` -100,
mean over the target tokens, or sum / ``num_items_in_batch`` when the Trainer passes it
(gradient accumulation); an explicit ``shift_labels`` is used as given. Both are weighted sums
with weights known before the forward (1/n_target or 1/num_items_in_batch per target token),
so the gradients are formed during the forward: three LM-head products instead of four, two
when the head is frozen. Without labels the original forward runs untouched (generation,
evaluation logits).

Only the model's forward is wrapped (functools.wraps keeps its signature, which the Trainer
inspects); no modeling code is copied. A peft model is patched on its base model. Models that
transform their logits after the head (Gemma's softcapping, Cohere's scale, Granite's
scaling) or whose head is not a plain nn.Linear (e.g. LoRA on lm_head) are refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import Tensor

from r3v_fast.model.loading import unwrap_peft
from r3v_fast.ops import weighted_nll

__all__ = ["apply_fused_loss", "remove_fused_loss", "causal_lm_loss"]

_LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0}
_MISSING = object()


def causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor | None, *, bias: Tensor | None = None,
                   ignore_index: int = -100, num_items_in_batch: Tensor | int | None = None,
                   shift_labels: Tensor | None = None, backend: str = "auto") -> Tensor:
    """HF's ForCausalLMLoss on hidden [B, S, D] and lm_head weight [V, D], without logits.

    Mean of -log p over target tokens (NaN if there are none, like F.cross_entropy), or their
    sum / num_items_in_batch when given: ``weighted_nll`` with token weights 1/denominator,
    whose gradients come out of the forward. The denominator stays a device tensor: no sync.
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # [B, S]
    shift_labels = shift_labels.to(hidden.device)
    is_target = shift_labels != ignore_index  # [B, S]
    if num_items_in_batch is None:
        denominator = is_target.sum()
    elif torch.is_tensor(num_items_in_batch):
        denominator = num_items_in_batch.to(hidden.device)
    else:
        denominator = torch.tensor(num_items_in_batch, device=hidden.device)
    token_weights = is_target.to(torch.float32) / denominator  # [B, S]; 1/n in fp32 per target token
    loss = weighted_nll(hidden, weight, shift_labels, token_weights, bias=bias, ignore_index=ignore_index,
                        backend=backend)
    # No targets: 0/0 weights, yet ignored tokens weigh nothing, so the sum is 0; NaN as HF's.
    return torch.where(denominator != 0, loss, float("nan"))


def _return_hidden_states(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def _head_returns_its_input(head: torch.nn.Module):
    """For the duration: head(x) is x. Restores any instance-level forward (e.g. accelerate hooks)."""
    previous = head.__dict__.get("forward", _MISSING)
    head.forward = _return_hidden_states
    try:
        yield
    finally:
        if previous is _MISSING:
            del head.forward
        else:
            head.forward = previous


def _lm_head(model) -> torch.nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"apply_fused_loss: {type(model).__name__} has no output embeddings (lm_head)")
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"apply_fused_loss: the LM head of {type(model).__name__} is a {type(head).__name__}, "
                         "not a plain nn.Linear (LoRA on lm_head is not supported; merge it first)")
    return head


def _check_plain_logits(model) -> None:
    config = model.config
    configs = [config] + [getattr(config, name) for name in ("text_config",) if getattr(config, name, None)]
    for cfg in configs:
        for name, neutral in _LOGIT_POSTPROCESSING.items():
            value = getattr(cfg, name, neutral)
            if value != neutral:
                raise ValueError(f"apply_fused_loss: {type(model).__name__} post-processes its logits "
                                 f"({name}={value}); only models whose logits are lm_head(hidden) are supported")


def apply_fused_loss(model, *, backend: str = "auto"):
    """Patch ``model`` in place (and return it) so that calls with ``labels`` use the fused loss.

    Calling it again only updates ``backend``; ``remove_fused_loss`` undoes it.
    """
    target = unwrap_peft(model)
    head = _lm_head(target)
    _check_plain_logits(target)
    original = target.__dict__.get("_r3v_original_forward") or target.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if args:  # positional arguments become keywords, so that labels is found wherever it is
            bound = signature.bind_partial(*args)
            kwargs = {**bound.arguments, **kwargs}
        labels = kwargs.pop("labels", None)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return original(**kwargs)
        loss_kwargs = dict(num_items_in_batch=kwargs.pop("num_items_in_batch", None),
                           ignore_index=kwargs.pop("ignore_index", -100), shift_labels=shift_labels)
        kwargs.pop("logits_to_keep", None)  # the loss needs every position
        as_tuple = kwargs.get("return_dict") is False
        if as_tuple:
            kwargs["return_dict"] = True
        with _head_returns_its_input(head):
            out = original(**kwargs)
        hidden = out.logits  # [B, S, D]: the head returned its input
        loss = causal_lm_loss(hidden, head.weight, labels, bias=head.bias, backend=target._r3v_backend,
                              **loss_kwargs)
        rest = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        result = type(out)(loss=loss, **rest)  # logits=None in both the attribute and the dict view
        return result.to_tuple() if as_tuple else result

    if "_r3v_original_forward" not in target.__dict__:  # an instance-level forward (hooks) comes back on removal
        target._r3v_previous_forward = target.__dict__.get("forward")
    target._r3v_backend = backend
    target._r3v_original_forward = original
    target.forward = forward
    return model


def remove_fused_loss(model):
    """Undo ``apply_fused_loss`` (no-op if it was not applied); returns ``model``."""
    target = unwrap_peft(model)
    if "_r3v_original_forward" in target.__dict__:
        previous = target._r3v_previous_forward
        del target.forward, target._r3v_original_forward, target._r3v_backend, target._r3v_previous_forward
        if previous is not None:
            target.forward = previous
    return model
