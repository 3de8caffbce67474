"""Microbenchmark of cascade decode attention: one decode step of K branches per question.

Compared in the same run, on the same inputs (uniform lengths, so every baseline is exact):

CPU (always; fp32, Q=4 questions, K = 3 and 8, Qwen2-VL-2B heads, P=1000, S=125):
    torch_cascade   r3v_fast reference cascade: [K*G, Dh] queries read the prefix once
    torch_paged     the same tokens in 16-token blocks of a pool (the continuous sampler's
                    layout), the torch path of the paged op (a gather of every valid own token
                    and a segment softmax: made for short, ragged branches, so slower than the
                    dense bmm path at these uniform lengths)
    cpp_paged       the paged op's C++ kernel (the continuous sampler's CPU path), if built
    torch_naive     per-branch full attention over a freshly concatenated [prefix; suffix]
                    (K copies of the prefix)
GPU (CUDA only; bf16, Q=32, K=8, H=12, Hkv=2, Dh=128, P=1000, S=125 = the mean step of a
250-token decode):
    triton          r3v_fast cascade kernel (auto split-K)
    triton_nosplit  the same with num_splits=1
    triton_paged    the paged cascade kernel on the same tokens in 16-token blocks (auto
                    split-K; and _nosplit): the cost of reading through block tables
    torch_cascade   the reference cascade on the GPU
    sdpa_k_copies   what K separate sequences do: each branch's cache holds its own copy of the
                    prefix ([Q*K, Hkv, P+S, Dh], already materialized), one SDPA call (GQA)
    torch_naive     per-branch concatenation + masked attention (reference naive)

Reported per implementation: µs per step, effective bandwidth = unique KV bytes (prefix once +
every suffix) / time, time relative to the cascade (torch_cascade on CPU, triton on GPU) and,
on GPU, peak memory above the inputs. GPU timings use CUDA graphs (20 steps per replay) so the
figure is device time, not Python launch overhead; the eager figure is reported too, as is the
device's copy bandwidth (a large device-to-device copy, read + write bytes) as the roofline.
Results: bench/results/cascade_attention.json, keyed by device.
Run: python -m pytest bench/bench_cascade_attention.py -q -s
(on a shared, busy CPU prefix OMP_NUM_THREADS=1: oversubscribed OpenMP threads spin and bury
the difference in noise; the thread count is saved with the results.)
"""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from r3v_fast.ops import cascade_attention as ops
from r3v_fast.reference import cascade_attention as reference

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "cascade_attention.json"
QWEN2VL_2B = dict(num_heads=12, num_kv_heads=2, head_dim=128, prefix_len=1000, suffix_len=125)
RESULTS: dict[str, dict] = {}


def make_inputs(num_q, num_branches, num_heads, num_kv_heads, head_dim, prefix_len, suffix_len,
                device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q = rand(num_q, num_branches, num_heads, head_dim)
    prefix_k, prefix_v = rand(num_q, num_kv_heads, prefix_len, head_dim), rand(num_q, num_kv_heads, prefix_len, head_dim)
    suffix_shape = (num_q, num_branches, num_kv_heads, suffix_len, head_dim)
    suffix_k, suffix_v = rand(*suffix_shape), rand(*suffix_shape)
    prefix_lens = torch.full((num_q,), prefix_len, dtype=torch.int32, device=device)
    suffix_lens = torch.full((num_q, num_branches), suffix_len, dtype=torch.int32, device=device)
    return q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens


def unique_kv_bytes(args) -> int:
    """Bytes of K and V a cascade must read: each prefix once plus every suffix."""
    _, prefix_k, prefix_v, _, suffix_k, suffix_v, _ = args
    return sum(t.numel() * t.element_size() for t in (prefix_k, prefix_v, suffix_k, suffix_v))


def sdpa_k_copies_setup(args):
    """The K-separate-sequences cache: [Q*K, Hkv, P+S, Dh] with the prefix copied per branch."""
    q, prefix_k, prefix_v, _, suffix_k, suffix_v, _ = args
    num_q, num_branches, num_heads, head_dim = q.shape
    expand = (num_q, num_branches, *prefix_k.shape[1:])

    def full(prefix, suffix):
        return torch.cat([prefix.unsqueeze(1).expand(expand), suffix], 3).flatten(0, 1)

    k_cache, v_cache = full(prefix_k, suffix_k), full(prefix_v, suffix_v)
    q_rows = q.reshape(num_q * num_branches, num_heads, 1, head_dim)
    return lambda: F.scaled_dot_product_attention(q_rows, k_cache, v_cache, enable_gqa=True)


def paged_args(args, block_size=16, seed=0):
    """The same tokens in the continuous sampler's layout: a pool of block_size-token blocks
    handed out in shuffled order, one question row per question, branch b of question q in
    slot q * K + b. -> the arguments of ops.paged_cascade_decode_attention."""
    q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens = args
    num_q, num_branches, num_heads, head_dim = q.shape
    num_kv_heads, p_max, s_max = prefix_k.shape[1], prefix_k.shape[2], suffix_k.shape[3]
    prefix_blocks, suffix_blocks = -(-p_max // block_size), -(-s_max // block_size)
    total = 1 + num_q * prefix_blocks + num_q * num_branches * suffix_blocks
    order = torch.randperm(total - 1, generator=torch.Generator().manual_seed(seed)).add(1).to(q.device)
    prefix_tables = order[:num_q * prefix_blocks].view(num_q, prefix_blocks)
    slot_tables = order[num_q * prefix_blocks:].view(num_q * num_branches, suffix_blocks)
    pools = []
    for prefix, suffix in ((prefix_k, suffix_k), (prefix_v, suffix_v)):
        pool = torch.zeros(total, num_kv_heads, block_size, head_dim, dtype=q.dtype, device=q.device)
        padded = torch.nn.functional.pad(prefix, (0, 0, 0, prefix_blocks * block_size - p_max))
        pool[prefix_tables.flatten()] = (padded.view(num_q, num_kv_heads, prefix_blocks, block_size, head_dim)
                                         .transpose(1, 2).flatten(0, 1))
        padded = torch.nn.functional.pad(suffix, (0, 0, 0, suffix_blocks * block_size - s_max)).flatten(0, 1)
        pool[slot_tables.flatten()] = (padded.view(-1, num_kv_heads, suffix_blocks, block_size, head_dim)
                                       .transpose(1, 2).flatten(0, 1))
        pools.append(pool)
    question_slots = torch.arange(num_q * num_branches, device=q.device).view(num_q, num_branches)
    return (q.flatten(0, 1), *pools, question_slots.int(), prefix_tables.int(), prefix_lens,
            slot_tables.int(), suffix_lens.flatten())


def implementations(args, device):
    paged = paged_args(args)
    impls = {
        "torch_cascade": lambda: ops.cascade_decode_attention(*args, backend="torch"),
        "torch_paged": lambda: ops.paged_cascade_decode_attention(*paged, backend="torch"),
        "torch_naive": lambda: reference.naive_decode_attention(*args),
    }
    if device == "cpu":
        from r3v_fast.ops import cpp_backend

        if cpp_backend.available():
            impls["cpp_paged"] = lambda: ops.paged_cascade_decode_attention(*paged, backend="cpp")
    if device == "cuda":
        impls = {
            "triton": lambda: ops.cascade_decode_attention(*args, backend="triton"),
            "triton_nosplit": lambda: ops.cascade_decode_attention(*args, num_splits=1, backend="triton"),
            "triton_paged": lambda: ops.paged_cascade_decode_attention(*paged, backend="triton"),
            "triton_paged_nosplit": lambda: ops.paged_cascade_decode_attention(*paged, num_splits=1,
                                                                               backend="triton"),
            **impls,
            "sdpa_k_copies": sdpa_k_copies_setup(args),
        }
    return impls


def cpu_us(fn, rounds=7) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def cuda_us(fn, steps=20, rounds=10, graph=True) -> float:
    """Median µs per call over `steps` back-to-back calls (replayed from a CUDA graph if asked)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run = lambda: [fn() for _ in range(steps)]  # noqa: E731
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            run()
        run = cuda_graph.replay
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / steps)
    return sorted(times)[len(times) // 2]


def cuda_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbps(nbytes=1 << 30) -> float:
    """Device-to-device copy: (read + write bytes) / time, the practical bandwidth roofline."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = cuda_us(lambda: dst.copy_(src), steps=5, rounds=5, graph=False)
    return 2 * nbytes / us / 1e3


def device_key(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not RESULTS:
        return
    RESULTS_PATH.parent.mkdir(exist_ok=True)
    saved = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.exists() else {}
    for key, entry in RESULTS.items():
        saved.setdefault(entry.pop("device_key"), {})[key] = entry
    RESULTS_PATH.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"\nresults -> {RESULTS_PATH}")
    for key, entry in RESULTS.items():
        print(f"{key}: shape {entry['shape']}")
        for name, r in entry["results"].items():
            extra = f"  eager {r['eager_us']:.1f} µs" if "eager_us" in r else ""
            peak = f"  peak {r['peak_mb']:.1f} MB" if "peak_mb" in r else ""
            print(f"  {name:15s} {r['us']:10.1f} µs {r['effective_gbps']:8.1f} GB/s "
                  f"x{r['time_over_cascade']:.2f}{extra}{peak}")


def _record(key, device, shape, args, results, baseline):
    kv_bytes = unique_kv_bytes(args)
    for r in results.values():
        r["effective_gbps"] = kv_bytes / r["us"] / 1e3
        r["time_over_cascade"] = r["us"] / results[baseline]["us"]
    entry = {"device_key": device_key(device), "torch": torch.__version__, "shape": shape,
             "cpu_threads": torch.get_num_threads(),
             "unique_kv_bytes": kv_bytes, "baseline": baseline, "results": results}
    if device == "cuda":
        entry["device"] = torch.cuda.get_device_name()
        entry["copy_bandwidth_gbps"] = copy_bandwidth_gbps()
        entry["triton_fraction_of_copy_bandwidth"] = (
            results["triton"]["effective_gbps"] / entry["copy_bandwidth_gbps"])
    RESULTS[key] = entry


@pytest.mark.parametrize("num_branches", [3, 8])
def test_cpu_cascade_vs_naive(num_branches, benchmark):
    shape = dict(num_q=4, num_branches=num_branches, **QWEN2VL_2B, dtype="float32")
    args = make_inputs(4, num_branches, **QWEN2VL_2B, device="cpu", dtype=torch.float32)
    impls = implementations(args, "cpu")
    results = {name: {"us": cpu_us(fn)} for name, fn in impls.items()}
    torch.testing.assert_close(impls["torch_cascade"](), impls["torch_naive"](), rtol=1e-4, atol=1e-5)
    for name in ("torch_paged", "cpp_paged"):
        if name in impls:
            torch.testing.assert_close(impls[name]().view(args[0].shape), impls["torch_cascade"](),
                                       rtol=1e-4, atol=1e-5)
    benchmark.pedantic(impls["torch_cascade"], rounds=3, warmup_rounds=1)
    _record(f"cpu_k{num_branches}", "cpu", shape, args, results, "torch_cascade")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_vs_naive_and_sdpa(benchmark):
    num_q, num_branches = 32, 8
    shape = dict(num_q=num_q, num_branches=num_branches, **QWEN2VL_2B, dtype="bfloat16")
    args = make_inputs(num_q, num_branches, **QWEN2VL_2B, device="cuda", dtype=torch.bfloat16)
    impls = implementations(args, "cuda")
    want = impls["sdpa_k_copies"]().reshape(args[0].shape).float()
    results = {}
    for name, fn in impls.items():
        torch.testing.assert_close(fn().reshape(args[0].shape).float(), want, rtol=2e-2, atol=2e-2)
        results[name] = {"us": cuda_us(fn), "eager_us": cuda_us(fn, graph=False),
                         "peak_mb": cuda_peak_bytes(fn) / 2**20}
    benchmark.pedantic(lambda: (impls["triton"](), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
    _record("gpu_qwen2vl2b_decode", "cuda", shape, args, results, "triton")
