"""Pure-PyTorch implementations: the "torch" backend of each op and the basis of test oracles.

Shipped code, not test-only: every op runs without Triton or the C++ extension.
"""

from . import segment_logprob

__all__ = ["segment_logprob"]
