"""Where the fused loss pays on the CPU: a training step of a small Llama, patched vs unpatched.

For each hidden size D and vocabulary V (2 layers, 4 sequences x 256 tokens, fp32, every token a
target, one thread), one forward + backward of the model's loss is timed, twice, interleaved:

    plain     the unpatched model: full logits + HF's cross-entropy
    fused     ``apply_fused_loss(model, small_head_fallback=False)``: weighted_nll, no logits

and, to see the part that differs without the decoder around it, the loss alone on 1024 tokens
of hidden states (forward + backward, gradients for hidden and head): ``head_plain`` (linear +
cross_entropy) vs ``head_fused`` (``r3v_fast.integrations.causal_lm_loss``).

Time: the minimum over ROUNDS runs of the wall-clock and of the process CPU time. The machine
has 2 cores shared with other work: one thread and the CPU time, which moves least when other
work competes, are what the dispatch rule reads; each pass is repeated to show the spread, and
the load average is saved with the results. This is what fixes ``CPU_FUSED_MIN_VOCAB`` in
r3v_fast/integrations.py. Results: bench/results/fused_loss_small_head.json.
Run: python bench/bench_fused_loss_small_head.py (R3V_BENCH_HIDDEN, R3V_BENCH_VOCAB: lists).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import save_result  # noqa: E402

from r3v_fast.integrations import apply_fused_loss, causal_lm_loss  # noqa: E402

HIDDEN = [int(d) for d in os.environ.get("R3V_BENCH_HIDDEN", "64,256").split(",")]
VOCABS = [int(v) for v in os.environ.get("R3V_BENCH_VOCAB", "96,384,768,1536,4096").split(",")]
BATCH, SEQ, ROUNDS, PASSES = 4, 256, 5, 2


def _model(hidden: int, vocab: int):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=SEQ)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


def _step_times(model, batch) -> tuple[float, float]:
    """(wall, cpu) seconds of one forward + backward: the minimum over ROUNDS after a warm-up."""
    walls, cpus = [], []
    for i in range(ROUNDS + 1):
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        model(**batch).loss.backward()
        if i:  # the first run warms up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def _head_times(hidden: int, vocab: int, tokens: int = 1024) -> dict[str, float]:
    """CPU seconds of the loss alone, forward + backward: the minimum over 9 runs after a warm-up."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(1, tokens, hidden, generator=g, requires_grad=True)  # [1, T, D]
    weight = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_(True)  # [V, D]
    labels = torch.randint(0, vocab, (1, tokens), generator=g)

    def plain():
        logits = states @ weight.T  # [1, T, V]
        torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:]).backward()

    def fused():
        causal_lm_loss(states, weight, labels).backward()

    times = {}
    for name, fn in (("head_plain", plain), ("head_fused", fused)):
        fn()
        runs = []
        for _ in range(9):
            start = time.process_time()
            fn()
            runs.append(time.process_time() - start)
        times[name] = min(runs)
    return times


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for hidden, vocab in [(d, v) for d in HIDDEN for v in VOCABS]:
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        batch = dict(input_ids=input_ids, labels=input_ids)
        plain = _model(hidden, vocab)
        fused = apply_fused_loss(copy.deepcopy(plain), small_head_fallback=False)
        runs = {"plain": [], "fused": []}
        heads = []
        for _ in range(PASSES):
            for name, model in (("plain", plain), ("fused", fused)):
                runs[name].append(_step_times(model, batch))
            heads.append(_head_times(hidden, vocab))
        entry = {name: {"wall_s": [round(w, 4) for w, _ in r], "cpu_s": [round(c, 4) for _, c in r]}
                 for name, r in runs.items()}
        for name in ("head_plain", "head_fused"):
            entry[name] = {"cpu_s": [round(h[name], 5) for h in heads]}
        entry["head_fused_over_plain_cpu"] = [round(h["head_fused"] / h["head_plain"], 3) for h in heads]
        entry["fused_over_plain_cpu"] = [round(f[1] / p[1], 3) for f, p in zip(runs["fused"], runs["plain"])]
        entry["fused_over_plain_wall"] = [round(f[0] / p[0], 3) for f, p in zip(runs["fused"], runs["plain"])]
        entry["load_average"] = [round(x, 2) for x in os.getloadavg()]
        results[hidden, vocab] = entry
        print(f"D={hidden} V={vocab}: fused/plain cpu {entry['fused_over_plain_cpu']} "
              f"wall {entry['fused_over_plain_wall']} head alone {entry['head_fused_over_plain_cpu']} (plain cpu {entry['plain']['cpu_s']} s, "
              f"load {entry['load_average']})", flush=True)
    setup = dict(batch=BATCH, seq=SEQ, layers=2, rounds=ROUNDS, passes=PASSES, dtype="float32", threads=1)
    for (hidden, vocab), entry in results.items():
        save_result("fused_loss_small_head.json", "cpu", f"hidden_{hidden}_vocab_{vocab}",
                    {**setup, "hidden": hidden, "vocab": vocab, **entry})


if __name__ == "__main__":
    main()
