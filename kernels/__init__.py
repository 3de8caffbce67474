"""Triton kernels, installed as ``r3v_fast.kernels``.

Kernels only: no autograd, no dispatch, no model patching (those live in ``r3v_fast.ops``
and ``r3v_fast.integrations``). Importing this package does not import Triton; each kernel
module does, so the package stays importable on machines without Triton.
"""
