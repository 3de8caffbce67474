"""Benchmark of tree packing (issue 6): one training pass, fwd + bwd, `tree` against `none`.

Both modes score the same examples with the same model through TargetLogprobs (the fused
segment loss), in micro-batches of at most MAX_TOKENS token slots, in the same run:

    none   one example per padded row (rows of similar length batched: little padding)
    tree   one token trie per image + question, several tries per row, tree attention

Reported per mode: seconds per pass (all micro-batches, forward + backward of the summed NLL),
token slots computed, peak memory, and, next to the tree/none speedup, the unique-token ratio
(example tokens / tree slots: the speedup an ideal implementation would reach). At an equal
token budget both modes fill their micro-batches, so the peak per micro-batch is about the same
and tree needs fewer micro-batches; the CPU run also measures all examples in one micro-batch,
which shows the memory saved for equal work.

CPU (always): the tiny Qwen2-VL of r3v_fast.model.tiny (wider than the test default) on a
shapes-math R³V mix built by the project's task builders from a synthetic pool (per question
[✓,✗,✗], [✓,✓,✗] or [✓,✓,✓] samples -> SFT, refine, selects) plus warm-up examples; fp32.
CPU peak memory is the bytes of activations saved for backward (largest micro-batch), counted
with saved-tensor hooks; no allocator statistics exist on the CPU.

GPU (CUDA only, skipped otherwise): a Qwen2-VL-2B-shaped random model (text 1536 x 28 layers,
12 / 2 heads, vocab 151,936; vision 1280 x 32 layers), bf16, decoder trainable and vision tower
frozen (as with LoRA on the language model). Each question: a 1000-token prefix (a 728x728
image = 676 image tokens, plus question text) and branches of 250 (SFT), 550 (refine) and 800
(select, twice). Peak memory = torch.cuda.max_memory_allocated above the weights. Target:
speedup >= 0.8 x unique-token ratio. The time to build the FlexAttention BlockMask from the
trie's ranges is reported separately (it is part of the tree step).

Results: bench/results/packing.json, keyed by device.
Run: python -m pytest bench/bench_packing.py -q -s
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from pathlib import Path

import pytest
import torch

from r3v_fast.engine.examples import TokenizedExample, mrope_positions, tokenize_examples
from r3v_fast.engine.packing import pack
from r3v_fast.engine.scoring import TargetLogprobs

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "packing.json"
MAX_TOKENS = 8192


# ---------------------------------------------------------------------------- measurement
class SavedBytes:
    """Bytes of tensors autograd saves for backward while active (distinct storages, weights
    excluded)."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.storages: dict[int, int] = {}
        self.exclude = exclude

    def pack(self, t):
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in self.exclude:
            self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def total(self) -> int:
        return sum(self.storages.values())


def run_pass(wrapper, batches, device, count_saved=False):
    """One training pass over ``batches``; returns (seconds, largest saved-activation bytes)."""
    largest = 0
    weights = {p.untyped_storage().data_ptr() for p in wrapper.parameters()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        batch = batch.to(device)
        saved = SavedBytes(weights)
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if count_saved else None
        if hooks is not None:
            with hooks:
                logp, n_tokens = wrapper(batch)
        else:
            logp, n_tokens = wrapper(batch)
        (-logp.sum() / n_tokens.sum()).backward()
        largest = max(largest, saved.total())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, largest


def compare(model, tokenized, device, rounds, count_saved):
    """Time both packings on the same examples; returns the result entry."""
    wrapper = TargetLogprobs(model)
    entry = {"examples": len(tokenized), "example_tokens": sum(len(t) for t in tokenized),
             "max_tokens": MAX_TOKENS}
    for mode in ("none", "tree"):
        batches = pack(tokenized, mode=mode, max_tokens=MAX_TOKENS, shuffle_seed=0)
        run_pass(wrapper, batches, device)            # warm-up (and FlexAttention compile)
        model.zero_grad(set_to_none=True)
        times, saved = [], 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(rounds):
            seconds, saved = run_pass(wrapper, batches, device, count_saved)
            times.append(seconds)
            model.zero_grad(set_to_none=True)
        entry[mode] = {"seconds": statistics.median(times), "micro_batches": len(batches),
                       "slots": sum(b.n_slots for b in batches)}
        if device.type == "cuda":
            entry[mode]["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            entry[mode]["saved_activations_mb"] = saved / 2**20
            # The same examples in a single micro-batch: memory for equal work, not equal budget.
            _, whole = run_pass(wrapper, pack(tokenized, mode=mode, max_tokens=10**7), device, True)
            entry[mode]["saved_activations_mb_one_batch"] = whole / 2**20
            model.zero_grad(set_to_none=True)
    entry["unique_token_ratio"] = entry["example_tokens"] / entry["tree"]["slots"]
    entry["none_slot_ratio"] = entry["none"]["slots"] / entry["tree"]["slots"]
    entry["speedup"] = entry["none"]["seconds"] / entry["tree"]["seconds"]
    entry["speedup_over_ratio"] = entry["speedup"] / entry["unique_token_ratio"]
    return entry


def device_key(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")


def save(key: str, entry: dict) -> None:
    RESULTS_PATH.parent.mkdir(exist_ok=True)
    saved = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.exists() else {}
    saved.setdefault(key, {}).update(entry)
    RESULTS_PATH.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"\n{key}: " + json.dumps(entry, indent=1))


# ---------------------------------------------------------------------------- CPU: tiny model
def shapes_math_mix(processor, folder, n_questions=24, n_warmup=6):
    """A realistic R³V training mix on shapes-math, through the project's task builders."""
    from r3v_fast.data import prompts
    from r3v_fast.data.records import read_records
    from r3v_fast.data.shapes import generate, template_cot
    from r3v_fast.engine.pool import Sample
    from r3v_fast.engine.tasks import build_examples
    from r3v_fast.engine.examples import Example

    paths = generate(folder, n_train=n_questions, n_test=0, n_warmup=n_warmup)
    records, _ = read_records(paths["train"])
    warm_records, _ = read_records(paths["warmup"])
    rng = random.Random(0)
    pool = {}
    for i, rec in enumerate(records):
        right = template_cot(rec)
        wrong = right.rsplit("Answer:", 1)[0] + f"Answer: {int(rec.answer) + 1 + rng.randrange(3)}"
        pattern = [(True, False, False), (True, True, False), (True, True, True)][i % 3]
        pool[rec.id] = [Sample(rec.id, 0, k, right if ok else wrong, None, ok) for k, ok in enumerate(pattern)]
    render = lambda m: prompts.render(processor, m)   # noqa: E731
    warmup = [Example("warmup", r.id, r.image, render(prompts.cot_messages(r)), template_cot(r), r.id)
              for r in warm_records]
    examples, counts = build_examples(records, pool, render, warmup=warmup)
    return examples, counts


def test_cpu_tiny_model_tree_vs_none(tmp_path):
    from r3v_fast.model.tiny import make_tiny_qwen2vl

    torch.manual_seed(0)
    model, processor = make_tiny_qwen2vl(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2)
    model.train()
    examples, counts = shapes_math_mix(processor, tmp_path)
    tokenized, dropped = tokenize_examples(processor, examples, max_length=2048)
    assert not dropped
    entry = compare(model, tokenized, torch.device("cpu"), rounds=3, count_saved=True)
    entry.update(model="tiny Qwen2-VL, text 256 x 4 layers, fp32", tasks=dict(counts),
                 threads=torch.get_num_threads())
    save(f"cpu:{device_key(torch.device('cpu'))}", entry)


# ---------------------------------------------------------------------------- GPU: 2B shape
QWEN2VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=32_768,
                       rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[16, 24, 24]))
QWEN2VL_2B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
IMAGE_TOKEN, GRID = 151_655, (1, 52, 52)   # 728x728 px -> 52x52 patches -> 26x26 = 676 tokens
PREFIX, BRANCHES = 1000, (("sft", 250), ("refine", 550), ("select", 800), ("select", 800))


def synthetic_question(q: int, gen: torch.Generator) -> list[TokenizedExample]:
    """One question's examples: [text 20 | image 676 | question text] = 1000-token prefix, then
    branches (first branch token differs, so all four fork at the prefix end)."""
    n_image = GRID[0] * GRID[1] * GRID[2] // 4
    text = lambda n: torch.randint(1000, 100_000, (n,), generator=gen)   # noqa: E731
    prefix = torch.cat([text(20), torch.full((n_image,), IMAGE_TOKEN), text(PREFIX - 20 - n_image)])
    pixels = {"pixel_values": torch.randn(GRID[0] * GRID[1] * GRID[2], 1176, generator=gen),
              "image_grid_thw": torch.tensor([GRID])}
    out = []
    for b, (task, length) in enumerate(BRANCHES):
        ids = torch.cat([prefix, torch.tensor([b + 10]), text(length - 1)])
        out.append(TokenizedExample(
            input_ids=ids, n_target=length, task=task, group=f"q{q}", index=4 * q + b, question_id=f"q{q}",
            image=f"q{q}.png", image_inputs=pixels, image_spans=((20, 20 + n_image),),
            rope_positions=mrope_positions(ids, IMAGE_TOKEN, pixels["image_grid_thw"], 2)))
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_qwen2vl_2b_shape_tree_vs_none():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    device = torch.device("cuda")
    config = Qwen2VLConfig(text_config=QWEN2VL_2B_TEXT, vision_config=QWEN2VL_2B_VISION,
                           image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1,
                           vision_start_token_id=IMAGE_TOKEN - 3, vision_end_token_id=IMAGE_TOKEN - 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.train()
    model.model.visual.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    tokenized = [ex for q in range(8) for ex in synthetic_question(q, gen)]
    entry = compare(model, tokenized, device, rounds=5, count_saved=False)

    tree = pack(tokenized, mode="tree", max_tokens=MAX_TOKENS)[0].to(device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tree.tree.block_mask()
    torch.cuda.synchronize()
    entry["block_mask_ms"] = 1000 * (time.perf_counter() - start)
    entry.update(model="Qwen2-VL-2B shape, random, bf16, vision frozen", prefix=PREFIX,
                 branches=[n for _, n in BRANCHES], torch=torch.__version__)
    save(f"cuda:{device_key(device)}", entry)
    assert entry["speedup_over_ratio"] >= 0.8, "target: tree speedup >= 80% of the unique-token ratio"
