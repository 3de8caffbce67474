"""Public ops of r3v_fast: torch.library registration, fake kernels, autograd, backend dispatch.

Every op is found the same way: a public function here, a registered ``torch.ops.r3v.*`` op
behind it, backends chosen by one rule (r3v_fast/ops/backend.py):

======================================  ===============================================
``token_logprob`` / ``segment_logprob``  fused LM-head log-likelihood, any upstream gradient
                                        (``r3v::token_logprob``, ``r3v::token_logprob_backward``,
                                        ``r3v::segment_sum``)
``weighted_nll``                        fused LM-head loss -Σ w_t·log p_t with known token
                                        weights, gradients formed in the forward
                                        (``r3v::weighted_nll``)
``cascade_decode_attention``            one decode step of K branches over a shared prefix
                                        (``r3v::cascade_decode_attention``)
``paged_cascade_decode_attention``      the same over a block pool, one query per decode slot
                                        (``r3v::paged_cascade_decode_attention``)
======================================  ===============================================

Importing this package registers the ops. The code map in the README lists each op's kernel,
reference, test and benchmark.
"""

from .cascade_attention import cascade_decode_attention, paged_cascade_decode_attention
from .segment_logprob import segment_logprob, token_logprob
from .weighted_nll import weighted_nll

__all__ = ["token_logprob", "segment_logprob", "weighted_nll", "cascade_decode_attention",
           "paged_cascade_decode_attention"]
