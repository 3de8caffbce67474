"""Public ops of r3v_fast: torch.library registration, fake kernels, autograd, backend dispatch.

``token_logprob`` / ``segment_logprob``: the fused LM-head log-likelihood (importing this
package registers ``r3v::token_logprob``, ``r3v::token_logprob_backward``, ``r3v::segment_sum``).
Other ops live in their own submodules (e.g. ``r3v_fast.ops.cascade_attention``).

Note: the name ``r3v_fast.ops.segment_logprob`` is the function; its module is reachable as
``importlib.import_module("r3v_fast.ops.segment_logprob")``.
"""

from .segment_logprob import segment_logprob, token_logprob

__all__ = ["token_logprob", "segment_logprob"]
