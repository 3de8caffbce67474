"""Drop the fused log-likelihood into any transformers causal LM or VLM: ``apply_fused_loss``.

    model = AutoModelForCausalLM.from_pretrained(...)      # or Qwen2-VL, Qwen2.5-VL, LLaVA, ...
    apply_fused_loss(model)                                 # one line; Trainer as usual
    out = model(input_ids, attention_mask=mask, labels=labels)   # training: out.loss, out.logits is None

With ``labels``, in training mode, the patched forward runs the model's own forward with the LM
head turned into the identity for the duration of the call, so the model returns its final
hidden states where the logits would be; the loss is then ``r3v_fast.ops.weighted_nll`` on
those states and the head's weight (and bias). The [tokens x vocab] logits are never formed,
in forward or backward. The loss is HF's default causal-LM loss: labels shifted left by one,
``ignore_index`` -100, mean over the target tokens, or sum / ``num_items_in_batch`` when the
Trainer passes it (gradient accumulation); an explicit ``shift_labels`` is used as given. Both
are weighted sums with weights known before the forward (1/n_target or 1/num_items_in_batch per
target token), so the gradients are formed during the forward: three LM-head products instead
of four, two when the head is frozen.

The original forward runs untouched, logits and HF's loss included, when:

- there are no labels (generation, plain inference);
- the model is in eval mode: ``Trainer.evaluate`` / ``predict`` hand the logits to
  ``compute_metrics``, and no gradient is kept there, so the logits cost no backward memory;
- the head is on the CPU and its vocabulary is below ``CPU_FUSED_MIN_VOCAB``: such logits are
  small, and the plain path is as fast or faster there (measured: bench/bench_fused_loss_small_head.py,
  figures in bench/results/fused_loss_small_head.json). ``small_head_fallback=False`` turns this
  off; ``uses_fused_path`` is the rule.

**TRL.** TRL 1.x trainers (SFTTrainer, DPOTrainer, ...) install their own fused LM head in
their constructor (``trl.trainer.utils.add_fused_lm_head``) and call the model with
``fused_lm_head=True``, expecting a ``FusedCausalLMOutput``: per-token ``log_probs`` with a
gradient, ``label_mask``, and per-token metrics (``entropy``, ``is_top1``, ``mean_logits``,
``log_sum_sq_probs``). A model patched *after* the trainer is built answers that call itself:
the per-token log-probabilities come from ``r3v_fast.ops.token_logprob`` (TRL's losses weight
them after the forward, e.g. DPO's sequence sums, so the op's any-upstream-gradient form is the
one that fits), the metrics from one extra chunked pass over the LM head without gradient (only
those TRL asked for). A model patched before the trainer is built is wrapped by TRL's head and
bypassed: patch ``trainer.model`` (and ``trainer.ref_model``) after.

**peft.** The head may be an ``nn.Linear``, a peft ``ModulesToSaveWrapper`` (``modules_to_save=
["lm_head"]``: the active adapter's copy, or the original when adapters are off) or a LoRA
``Linear`` on ``lm_head``: logits = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ is one product of the hidden states
extended by the r LoRA activations [x | s·drop(x)·Aᵀ] with the weight [W | B] (exact under
LoRA dropout, gradients to A and B through autograd). The head is looked up on every call, so
``merge_and_unload()`` returns the base model still patched and still right (its head is then a
plain Linear); ``remove_fused_loss`` undoes the patch.

Only the model's forward is wrapped (functools.wraps keeps its signature, which the Trainer
inspects); no modeling code is copied. A peft model is patched on its base model. Models that
transform their logits after the head (Gemma's softcapping, Cohere's scale, Granite's scaling)
and LoRA variants (DoRA, ...) on the head are refused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import Tensor

from r3v_fast.model.loading import unwrap_peft
from r3v_fast.ops import token_logprob, weighted_nll

__all__ = ["apply_fused_loss", "remove_fused_loss", "causal_lm_loss", "CPU_FUSED_MIN_VOCAB", "uses_fused_path"]

# Below this vocabulary a CPU head takes the plain path (logits + HF's loss): the [T x V] logits
# are then small, and the fused loss alone measured slower or even there (up to 2.1x at V = 96),
# faster from V = 1536 on (bench/bench_fused_loss_small_head.py, figures in the README).
CPU_FUSED_MIN_VOCAB = 1024

_LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0}
_TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_METRIC_CHUNK = 1024  # tokens per chunk of the metrics pass: [1024 x V] fp32 logits at most
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


# ---------------------------------------------------------------- the head's effective weight
def _peft_layer_kinds():
    """(ModulesToSaveWrapper, lora.Linear, BaseTunerLayer) of the installed peft, or Nones."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None, None, None
    return ModulesToSaveWrapper, LoraLinear, BaseTunerLayer


def _active_module(head: torch.nn.Module) -> torch.nn.Module:
    """The module a peft ModulesToSaveWrapper's forward would call (it mirrors that forward)."""
    adapters = list(head.active_adapters)
    if head.disable_adapters or not adapters or any(a not in head.modules_to_save for a in adapters):
        return head.original_module
    return head.modules_to_save[adapters[0]]


def _check_head(head: torch.nn.Module, model_name: str) -> None:
    """Raise, naming the module, unless ``_effective_head`` can express ``head``."""
    modules_to_save, lora_linear, tuner_layer = _peft_layer_kinds()
    if isinstance(head, torch.nn.Linear) and not (tuner_layer and isinstance(head, tuner_layer)):
        return
    if modules_to_save is not None and isinstance(head, modules_to_save):
        return _check_head(_active_module(head), model_name)
    if lora_linear is not None and isinstance(head, lora_linear):
        if head.lora_variant:
            raise ValueError(f"apply_fused_loss: the LM head of {model_name} is a LoRA variant "
                             f"({', '.join(type(v).__name__ for v in head.lora_variant.values())}), whose "
                             "output is not a linear map of the hidden states; merge it first (merge_and_unload)")
        return _check_head(head.base_layer, model_name)
    raise ValueError(f"apply_fused_loss: the LM head of {model_name} is a {type(head).__module__}."
                     f"{type(head).__name__}; supported heads: torch.nn.Linear, peft's ModulesToSaveWrapper "
                     "(modules_to_save=['lm_head']) and LoRA Linear on lm_head")


def _effective_head(head: torch.nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(hidden', weight [V, D'], bias [V] | None) with head(hidden) == hidden'·weightᵀ + bias.

    For LoRA (logits = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ) the hidden states gain the r activations
    s·drop(x)·Aᵀ and the weight gains B's columns: [x | s·drop(x)·Aᵀ]·[W | B]ᵀ. That is exact
    whatever the dropout draws (the same draw as peft's forward would take), and costs a
    [V, D + r] copy of the weight; A, B, W and x get their gradients through autograd.
    """
    modules_to_save, lora_linear, _ = _peft_layer_kinds()
    if modules_to_save is not None and isinstance(head, modules_to_save):
        return _effective_head(_active_module(head), hidden)
    if lora_linear is not None and isinstance(head, lora_linear):
        if head.disable_adapters and head.merged:
            head.unmerge()  # as peft's forward does: adapters off means the base weight alone
        hidden, weight, bias = _effective_head(head.base_layer, hidden)
        if head.disable_adapters or head.merged:
            return hidden, weight, bias
        extra_hidden, extra_weight, extra_bias = [hidden], [weight], bias
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            lora_a, lora_b = head.lora_A[name], head.lora_B[name]
            x = hidden.to(lora_a.weight.dtype)  # peft casts the input to the adapter's dtype too
            activations = lora_a(head.lora_dropout[name](x)) * head.scaling[name]  # [B, S, r]
            extra_hidden.append(activations.to(hidden.dtype))
            extra_weight.append(lora_b.weight.to(weight.dtype))  # [V, r]
            if lora_b.bias is not None:  # lora_bias=True: B's bias is scaled like its output
                scaled = lora_b.bias.to(weight.dtype) * head.scaling[name]
                extra_bias = scaled if extra_bias is None else extra_bias + scaled
        return torch.cat(extra_hidden, dim=-1), torch.cat(extra_weight, dim=1), extra_bias
    return hidden, head.weight, head.bias


def _lm_head(model) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"apply_fused_loss: {type(model).__name__} has no output embeddings (lm_head)")
    _check_head(head, type(model).__name__)
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


def _base_linear(head: torch.nn.Module) -> torch.nn.Linear:
    """The nn.Linear under a peft wrapper or LoRA layer (the head itself when it is one)."""
    modules_to_save, lora_linear, _ = _peft_layer_kinds()
    if modules_to_save is not None and isinstance(head, modules_to_save):
        return _base_linear(_active_module(head))
    if lora_linear is not None and isinstance(head, lora_linear):
        return _base_linear(head.base_layer)
    return head


def uses_fused_path(head: torch.nn.Module, small_head_fallback: bool = True) -> bool:
    """The documented dispatch rule: fused, unless the head is on the CPU with a vocabulary
    smaller than ``CPU_FUSED_MIN_VOCAB`` (and the fallback is on)."""
    weight = _base_linear(head).weight  # [V, D]
    return not (small_head_fallback and weight.device.type == "cpu" and weight.shape[0] < CPU_FUSED_MIN_VOCAB)


# ---------------------------------------------------------------- TRL's fused_lm_head protocol
def _trl_head_settings(forward) -> dict:
    """The ``outputs`` and ``temperature`` a TRL ``add_fused_lm_head`` wrapper was built with
    (read from its closure), or all outputs at temperature 1 when ``forward`` is not one."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    closure = getattr(getattr(forward, "__func__", forward), "__closure__", None)
    if code is None or code.co_name != "_fused_forward" or closure is None:
        return {"outputs": _TRL_OUTPUTS, "temperature": 1.0}
    values = dict(zip(code.co_freevars, (cell.cell_contents for cell in closure)))
    return {"outputs": tuple(values.get("outputs", _TRL_OUTPUTS)), "temperature": values.get("temperature", 1.0)}


@torch.no_grad()
def _token_metrics(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                   wanted: tuple[str, ...]) -> dict[str, Tensor]:
    """TRL's per-token metrics of the target tokens, chunk by chunk, fp32, without gradient.

    hidden [N, D], targets [N]: entropy H = lse - Σ p·z, is_top1 (target is the argmax),
    mean_logits (mean of z over V), log_sum_sq_probs log Σ p² = logsumexp(2z) - 2·lse.
    Autocast is off here: under bf16 autocast the product would round the logits to bf16
    (entropy off by ~1e-3), while the log-probabilities of token_logprob accumulate in fp32.
    """
    metrics = {name: [] for name in wanted}
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], _METRIC_CHUNK):
            _metrics_of_chunk(hidden[start:start + _METRIC_CHUNK], weight, bias,
                              targets[start:start + _METRIC_CHUNK], metrics)
    return {name: torch.cat(parts) if parts else hidden.new_zeros(0) for name, parts in metrics.items()}


def _metrics_of_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                      metrics: dict[str, list[Tensor]]) -> None:
    z = torch.nn.functional.linear(hidden.float(), weight.float(),
                                   None if bias is None else bias.float())  # [n, V] fp32
    lse = torch.logsumexp(z, dim=-1)  # [n]
    if "entropy" in metrics:
        metrics["entropy"].append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
    if "is_top1" in metrics:
        metrics["is_top1"].append(z.argmax(-1) == targets)
    if "mean_logits" in metrics:
        metrics["mean_logits"].append(z.mean(-1))
    if "log_sum_sq_probs" in metrics:
        metrics["log_sum_sq_probs"].append(torch.logsumexp(2 * z, dim=-1) - 2 * lse)


def _trl_fused_output(target, head, hidden: Tensor, labels, shift_labels, num_items_in_batch, backend: str):
    """What TRL's ``_fused_forward`` returns, with the log-probabilities from ``token_logprob``."""
    from trl.trainer.utils import FusedCausalLMOutput

    settings = _trl_head_settings(target._r3v_original_forward)
    if settings["temperature"] != 1.0:
        raise ValueError(f"apply_fused_loss: TRL asked for log-probabilities at temperature "
                         f"{settings['temperature']}; the fused loss serves temperature 1 only (SFT, DPO)")
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]  # [B, S-1, D], [B, S-1]
    else:
        labels = shift_labels
    hidden, weight, bias = _effective_head(head, hidden)
    labels = labels.to(weight.device)
    mask = labels != -100  # [B, S']
    hidden = hidden.to(weight.device)
    log_probs = token_logprob(hidden, weight, labels, bias=bias, backend=backend).view(mask.shape)  # 0 if ignored
    fields = {"log_probs": log_probs}
    wanted = tuple(name for name in settings["outputs"] if name != "log_probs")
    if wanted:
        computed = _token_metrics(hidden[mask], weight, bias, labels[mask], wanted)  # only the target tokens
        for name, values in computed.items():
            fields[name] = values.new_zeros(mask.shape).masked_scatter(mask, values)
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, label_mask=mask, **fields)


# ---------------------------------------------------------------- the patch
def apply_fused_loss(model, *, backend: str = "auto", small_head_fallback: bool = True):
    """Patch ``model`` in place (and return it) so that training calls with ``labels`` (and TRL's
    ``fused_lm_head=True`` calls) use the fused loss.

    small_head_fallback: with ``labels``, a CPU head with fewer than ``CPU_FUSED_MIN_VOCAB`` rows
    takes the plain path (TRL's calls are always fused).
    Calling it again updates the settings (and wraps a forward installed in between, such as
    TRL's); ``remove_fused_loss`` undoes it.
    """
    target = unwrap_peft(model)
    _lm_head(target)
    _check_plain_logits(target)
    current = target.__dict__.get("forward")
    ours = current is not None and getattr(current, "_r3v_fused_loss", False)
    original = target._r3v_original_forward if ours else target.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if args:  # positional arguments become keywords, so that labels is found wherever it is
            bound = signature.bind_partial(*args)
            kwargs = {**bound.arguments, **kwargs}
        head = _lm_head(target)  # looked up per call: peft, merge_and_unload and FSDP replace it
        fused_lm_head = kwargs.pop("fused_lm_head", False)
        if fused_lm_head:
            if kwargs.get("output_router_logits"):
                raise ValueError("apply_fused_loss: TRL's MoE auxiliary loss (output_router_logits) is not "
                                 "supported; remove the patch for this model")
            labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
            num_items_in_batch = kwargs.pop("num_items_in_batch", None)
            kwargs.pop("logits_to_keep", None)
            kwargs["use_cache"] = False
            kwargs["return_dict"] = True
            with _head_returns_its_input(head):
                hidden = original(**kwargs).logits  # [B, S, D]: the head returned its input
            return _trl_fused_output(target, head, hidden, labels, shift_labels, num_items_in_batch,
                                     target._r3v_backend)
        has_labels = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
        if not (has_labels and target.training
                and uses_fused_path(head, target._r3v_small_head_fallback)):
            return original(**kwargs)
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        loss_kwargs = dict(num_items_in_batch=kwargs.pop("num_items_in_batch", None),
                           ignore_index=kwargs.pop("ignore_index", -100), shift_labels=shift_labels)
        kwargs.pop("logits_to_keep", None)  # the loss needs every position
        as_tuple = kwargs.get("return_dict") is False
        if as_tuple:
            kwargs["return_dict"] = True
        with _head_returns_its_input(head):
            out = original(**kwargs)
        hidden, weight, bias = _effective_head(head, out.logits)  # out.logits [B, S, D]: the head's input
        loss = causal_lm_loss(hidden, weight, labels, bias=bias, backend=target._r3v_backend, **loss_kwargs)
        rest = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        result = type(out)(loss=loss, **rest)  # logits=None in both the attribute and the dict view
        return result.to_tuple() if as_tuple else result

    forward._r3v_fused_loss = True
    if not ours:  # an instance-level forward (hooks, TRL's head) comes back on removal
        target._r3v_previous_forward = current
    target._r3v_backend = backend
    target._r3v_small_head_fallback = small_head_fallback
    target._r3v_original_forward = original
    target.forward = forward
    return model


def remove_fused_loss(model):
    """Undo ``apply_fused_loss`` (no-op if it was not applied); returns ``model``."""
    target = unwrap_peft(model)
    if "_r3v_original_forward" in target.__dict__:
        previous = target._r3v_previous_forward
        del (target.forward, target._r3v_original_forward, target._r3v_backend, target._r3v_previous_forward,
             target._r3v_small_head_fallback)
        if previous is not None:
            target.forward = previous
    return model
