"""Public scoring API: per-example target log-likelihoods of a VLM, without full logits.

    from r3v_fast.scoring import sequence_logprobs
    logp = sequence_logprobs(model, processor, examples)      # Tensor[len(examples)] float32

The implementation lives in r3v_fast.engine.scoring (where the trainer uses it); this module
keeps the stable import path.
"""

from r3v_fast.engine.scoring import TargetLogprobs, sequence_logprobs

__all__ = ["TargetLogprobs", "sequence_logprobs"]
