"""One backend resolver for every op of r3v_fast.ops.

Each public op takes ``backend="auto" | "triton" | "cpp" | "torch"`` (docs/architecture.md,
"Ops and backends"). The rules are the same for all of them, so they live here once:

* "auto" is replaced by the ``R3V_BACKEND`` environment variable when it is set (an explicit
  argument always wins over the variable);
* "auto" then picks "triton" for CUDA tensors when Triton imports, "cpp" for CPU tensors when
  the op has a C++ kernel and the extension ``r3v_fast._C`` is built, else "torch";
* ``R3V_BACKEND=cpp`` means "the native CPU path": for an op without a C++ kernel that is its
  torch backend;
* an explicit backend that cannot run raises, naming the op and the reason.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "resolve_backend", "triton_available", "cpp_available"]

BACKENDS = ("auto", "triton", "cpp", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpp_available() -> bool:
    """True iff the C++ extension r3v_fast._C was built and imports."""
    from r3v_fast.ops import cpp_backend

    return bool(cpp_backend.available())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(op: str, backend: str, device: torch.device, *, has_cpp: bool = True) -> str:
    """The concrete backend ("triton" | "cpp" | "torch") that ``op`` runs on ``device``.

    ``has_cpp``: whether the op has a C++ kernel at all.
    """
    from_env = backend == "auto"
    if from_env:
        backend = os.environ.get("R3V_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        where = "R3V_BACKEND" if from_env else "argument"
        raise ValueError(f"{op}: unknown backend {backend!r} ({where}); expected one of {BACKENDS}")
    if backend == "cpp" and not has_cpp:
        if from_env:   # the global "native CPU path" request: this op's CPU path is torch
            return "torch"
        raise ValueError(f"{op}: no 'cpp' backend for this op; use 'torch' or 'triton'")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "cpp" if has_cpp and device.type == "cpu" and cpp_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' requested but Triton is not installed")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"{op}: backend='triton' needs CUDA tensors (got {device}); "
                               "set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter")
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"{op}: backend='cpp' runs on CPU tensors only (got {device})")
        if not cpp_available():
            raise RuntimeError(f"{op}: backend='cpp' requested but the C++ extension r3v_fast._C "
                               "is not built (pip install -e . with CMake and a C++ compiler)")
    return backend
