"""End-to-end benchmark of shared-prefix sampling (issue 7): ``shared`` against ``hf``.

Both samplers get the same questions (image + CoT prompt), sample K branches each with the
public R³V setting (temperature 0.9, top-p 0.95, top-k 50) and a forced length (no stop
token: every branch decodes exactly L new tokens), in the same run:

    hf      transformers ``generate`` with num_return_sequences=K on the whole batch: K full
            copies of every prompt (prefill and vision encoder included) and of its KV cache
            (what HFSampler does; here with min_new_tokens = L to force the length)
    shared  r3v_fast SharedPrefixSampler: one prefill per question, K branches decoding
            against one copy of the prefix KV (cascade attention; CUDA graphs on GPU)

Reported per sampler: wall seconds for the whole call (prefill + decode), generated tokens
per second, the speedup of shared over hf, and the peak KV-cache bytes: for shared the bytes
its cache held (prefix slots + branch buffers, ``last_stats``), for hf the bytes of the
DynamicCache that generate returns (it only grows, so its final size is its peak), next to
the analytic K x (P + L) and P + K x L token counts per question.

CPU (always): tiny random Qwen2-VL (text 256 x 4 layers, fp32), 8 questions (224 px images,
64 image tokens, ~120-token prompts), L = 64, K = 3 and 8.
GPU (CUDA only, skipped otherwise): a Qwen2-VL-2B-shaped random model (text 1536 x 28 layers,
12 / 2 heads, vocab 151,936; vision 1280 x 32 layers), bf16, 32 questions with a 1000-token
prefix (a 448 px image = 256 image tokens + question text), K = 8, L = 250. Targets: shared
>= 3x the hf throughput, shared KV <= P + K x L tokens per question. Also reported: the
cascade kernel's bandwidth at the mean decode step of that run (unique KV bytes / time,
CUDA-graph replay) against the device's copy bandwidth, and peak device memory of each call.

Results: bench/results/sampler.json, keyed by device.
Run: python -m pytest bench/bench_sampler.py -q -s
(on a shared, busy CPU prefix OMP_NUM_THREADS=1; the thread count is saved with the results.)
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r3v_fast.data import prompts
from r3v_fast.data.records import Record
from r3v_fast.engine.sampler import Request, SamplingParams, load_images
from r3v_fast.engine.shared_sampler import SharedPrefixSampler
from r3v_fast.model.loading import pad_id

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "sampler.json"
R3V_SAMPLING = dict(temperature=0.9, top_p=0.95, top_k=50)
WORDS = ("how many red blue green yellow objects are there left after removing all circles squares "
         "triangles count the shapes in the image and add them up then subtract the small ones").split()


# ---------------------------------------------------------------------------- helpers
def device_key(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")


def save(key: str, entry: dict) -> None:
    RESULTS_PATH.parent.mkdir(exist_ok=True)
    saved = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.exists() else {}
    saved.setdefault(key, {}).update(entry)
    RESULTS_PATH.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"\n{key}: " + json.dumps(entry, indent=1))


def make_requests(processor, folder: Path, n: int, image_px: int, prefix_tokens: int | None, seed=0):
    """n CoT requests on random images; with prefix_tokens, the question text is cut so that the
    rendered prompt is exactly that many tokens (image tokens included)."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        path = folder / f"q{i}.png"
        Image.fromarray(rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)).save(path)
        words = list(rng.choice(WORDS, size=4000 if prefix_tokens else 12))

        def render(k):
            record = Record(id=str(i), image=str(path), question=" ".join(words[:k]) + "?", answer="1",
                            dataset="shapes-math")
            return Request(prompts.render(processor, prompts.cot_messages(record)), str(path))

        if prefix_tokens is None:
            requests.append(render(len(words)))
            continue
        lo, hi = 1, len(words)            # largest word count whose prompt fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if prompt_length(processor, render(mid)) <= prefix_tokens:
                lo = mid
            else:
                hi = mid - 1
        request = render(lo)
        short = prefix_tokens - prompt_length(processor, request)
        if short:   # top up with single-token words
            request = Request(request.prompt.replace("?", "?" + " a" * short, 1), request.image)
        requests.append(request)
    return requests


def prompt_length(processor, request) -> int:
    return processor(text=[request.prompt], images=load_images([request]), return_tensors="pt")["input_ids"].shape[1]


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_hf(model, processor, requests, k, new_tokens, seed=0):
    """generate on the whole batch, K return sequences, forced length. -> (seconds, KV bytes)."""
    device = model.device
    sync(device)
    start = time.perf_counter()
    inputs = processor(text=[r.prompt for r in requests], images=load_images(requests), return_tensors="pt",
                       padding=True).to(device)
    torch.manual_seed(seed)
    out = model.generate(**inputs, do_sample=True, num_return_sequences=k, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=pad_id(processor),
                         return_dict_in_generate=True, **R3V_SAMPLING)
    sync(device)
    seconds = time.perf_counter() - start
    assert out.sequences.shape == (len(requests) * k, inputs["input_ids"].shape[1] + new_tokens)
    return seconds, cache_bytes(out.past_key_values)


def run_shared(sampler, requests, k, new_tokens, seed=0):
    """-> (seconds, KV bytes held at peak)."""
    params = SamplingParams(k=k, max_new_tokens=new_tokens, seed=seed, **R3V_SAMPLING)
    sync(sampler.device)
    start = time.perf_counter()
    outputs = sampler._sample_branches(requests, params)
    sync(sampler.device)
    seconds = time.perf_counter() - start
    assert all(len(b.tokens) == new_tokens for branches in outputs for b in branches)
    return seconds, sampler.last_stats["peak_kv_bytes"]


def compare(model, processor, requests, k, new_tokens, rounds, sampler_kwargs=None, peak_memory=False):
    text = model.config.get_text_config()
    kv_token_bytes = (text.num_hidden_layers * 2 * text.num_key_value_heads
                      * (text.hidden_size // text.num_attention_heads) * model.dtype.itemsize)
    prompt_lens = [prompt_length(processor, r) for r in requests]
    sampler = SharedPrefixSampler(model, processor, batch_size=len(requests), show_progress=False,
                                  **(sampler_kwargs or {}))
    sampler.stop_ids = []                     # forced length: no branch stops early
    timings = {"hf": [], "shared": []}
    kv = {}
    memory = {}
    for name, run in (("hf", lambda: run_hf(model, processor, requests, k, new_tokens)),
                      ("shared", lambda: run_shared(sampler, requests, k, new_tokens))):
        for _ in range(rounds):
            if peak_memory:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            seconds, kv[name] = run()
            timings[name].append(seconds)
            if peak_memory:
                memory[name] = torch.cuda.max_memory_allocated() - base
    tokens = len(requests) * k * new_tokens
    best = {name: min(times) for name, times in timings.items()}
    p_max, p_mean = max(prompt_lens), sum(prompt_lens) / len(prompt_lens)
    entry = {
        "questions": len(requests), "k": k, "new_tokens": new_tokens, "prompt_tokens_mean": p_mean,
        "prompt_tokens_max": p_max,
        **{f"{name}_seconds": round(s, 4) for name, s in best.items()},
        **{f"{name}_tokens_per_s": round(tokens / s, 1) for name, s in best.items()},
        "speedup": round(best["hf"] / best["shared"], 3),
        "hf_kv_bytes": kv["hf"], "shared_kv_bytes": kv["shared"],
        "kv_ratio": round(kv["hf"] / kv["shared"], 3),
        # the same in tokens per question, against K (P + L) and P + K L
        "hf_kv_tokens_per_question": kv["hf"] / kv_token_bytes / len(requests),
        "shared_kv_tokens_per_question": kv["shared"] / kv_token_bytes / len(requests),
        "k_copies_tokens_per_question": k * (p_max + new_tokens),
        "prefix_plus_branches_tokens_per_question": p_max + k * new_tokens,
        "rounds": rounds,
    }
    if peak_memory:
        entry.update({f"{name}_peak_memory_bytes": b for name, b in memory.items()})
    return entry


# ---------------------------------------------------------------------------- CPU: tiny model
@pytest.mark.parametrize("k", [3, 8])
def test_cpu_tiny_model_shared_vs_hf(k, tmp_path):
    from r3v_fast.model.tiny import make_tiny_qwen2vl

    model, processor = make_tiny_qwen2vl(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                         max_pixels=224 * 224)
    processor.tokenizer.padding_side = "left"          # as load_vlm: generate pads on the left
    requests = make_requests(processor, tmp_path, n=8, image_px=224, prefix_tokens=None)
    compare(model, processor, requests[:2], k, 4, rounds=1)           # warm-up
    entry = compare(model, processor, requests, k, new_tokens=64, rounds=2)
    entry.update(model="tiny Qwen2-VL, text 256 x 4 layers, fp32", threads=torch.get_num_threads(),
                 torch=torch.__version__)
    save(f"cpu:{device_key(torch.device('cpu'))}", {f"k{k}": entry})
    assert entry["shared_kv_tokens_per_question"] <= entry["prefix_plus_branches_tokens_per_question"]


# ---------------------------------------------------------------------------- GPU: 2B shape
QWEN2VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=32_768,
                       rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[16, 24, 24]))
QWEN2VL_2B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
GPU_QUESTIONS, GPU_PREFIX, GPU_K, GPU_NEW = 32, 1000, 8, 250


def qwen2vl_2b_shape(processor, device):
    """A random bf16 Qwen2-VL with the 2B model's shapes, speaking the tiny processor's ids."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    roles = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2VLConfig(text_config={**QWEN2VL_2B_TEXT, **roles}, vision_config=QWEN2VL_2B_VISION,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                           **roles)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def kernel_bandwidth(device, num_q=GPU_QUESTIONS, k=GPU_K, suffix=GPU_NEW // 2):
    """Cascade kernel at the run's mean decode step: unique KV bytes / device time (CUDA graph of
    20 calls), and the device's copy bandwidth (1 GiB device-to-device copy, read + write)."""
    from r3v_fast.ops.cascade_attention import cascade_decode_attention

    heads, kv_heads, dim = QWEN2VL_2B_TEXT["num_attention_heads"], QWEN2VL_2B_TEXT["num_key_value_heads"], 128
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.bfloat16)  # noqa: E731
    q = rand(num_q, k, heads, dim)
    pk, pv = rand(num_q, kv_heads, GPU_PREFIX, dim), rand(num_q, kv_heads, GPU_PREFIX, dim)
    sk, sv = rand(num_q, k, kv_heads, suffix, dim), rand(num_q, k, kv_heads, suffix, dim)
    plen = torch.full((num_q,), GPU_PREFIX, dtype=torch.int32, device=device)
    slen = torch.full((num_q, k), suffix, dtype=torch.int32, device=device)
    call = lambda: cascade_decode_attention(q, pk, pv, plen, sk, sv, slen, backend="triton")  # noqa: E731
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 200
    unique = sum(t.numel() * t.element_size() for t in (pk, pv, sk, sv))
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    copy_gbs = 2 * src.numel() * 10 / (start.elapsed_time(end) / 1000) / 1e9
    return {"kernel_us": round(seconds * 1e6, 2), "kernel_gbs": round(unique / seconds / 1e9, 1),
            "copy_gbs": round(copy_gbs, 1), "kernel_fraction_of_copy": round(unique / seconds / 1e9 / copy_gbs, 3)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_qwen2vl_2b_shape_shared_vs_hf(tmp_path):
    from r3v_fast.model.tiny import make_tiny_qwen2vl

    device = torch.device("cuda")
    _, processor = make_tiny_qwen2vl(max_pixels=448 * 448, min_pixels=448 * 448)
    processor.tokenizer.padding_side = "left"
    model = qwen2vl_2b_shape(processor, device)
    requests = make_requests(processor, tmp_path, n=GPU_QUESTIONS, image_px=448, prefix_tokens=GPU_PREFIX)
    compare(model, processor, requests[:4], GPU_K, 8, rounds=1)                          # warm-up
    entry = compare(model, processor, requests, GPU_K, GPU_NEW, rounds=1, peak_memory=True)
    eager = compare(model, processor, requests[:8], GPU_K, 32, rounds=1, sampler_kwargs={"cuda_graphs": False})
    graphs = compare(model, processor, requests[:8], GPU_K, 32, rounds=1)
    entry.update(kernel_bandwidth(device))
    entry.update(model="Qwen2-VL-2B shape, random, bf16", torch=torch.__version__,
                 shared_8q_32tok_eager_seconds=eager["shared_seconds"],
                 shared_8q_32tok_graphs_seconds=graphs["shared_seconds"],
                 meets_3x_target=entry["speedup"] >= 3.0,
                 meets_kv_target=(entry["shared_kv_tokens_per_question"]
                                  <= entry["prefix_plus_branches_tokens_per_question"]))
    save(f"cuda:{device_key(device)}", entry)
    assert entry["meets_kv_target"], "target: shared KV <= P + K L tokens per question"
    assert entry["meets_3x_target"], "target: shared >= 3x the hf throughput"
