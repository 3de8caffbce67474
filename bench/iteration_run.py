"""One ``python -m r3v_fast.train`` run for bench/bench_iteration.py, with the benchmark's
controls on random-weight models (nothing here is used by the engine itself).

    python bench/iteration_run.py [--forced-lengths LO,HI] [--judge-by-hash] -- <train flags>

A model with random weights never ends a rationale by itself and never answers right, so the
GPU workload of the iteration benchmark fixes both, the same way in every configuration:

- ``--forced-lengths LO,HI``: branch b of the request keyed q has exactly
  ``LO + hash(q, b) % (HI - LO + 1)`` new tokens (stop tokens are ignored until then); the
  greedy evaluation branch is keyed "greedy"; the select reply has exactly
  ``--select-max-new-tokens`` tokens. Both samplers honour the same lengths: the shared-prefix
  samplers through their per-branch token budget, ``hf`` through a first logits processor
  that bans every stop token before the length and allows only one at it.
- ``--judge-by-hash``: a sample is right iff hash(question, iteration, sample index) is even,
  so the pool has mixed questions and the SFT / refine / select sets are built as with a real
  model, identical in every configuration whatever the (random) text says.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForceLength  # noqa: E402


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def forced_length(key: str, branch, low: int, high: int) -> int:
    return low + _hash(key, branch) % (high - low + 1)


def install_forced_lengths(low: int, high: int, select_tokens: int) -> None:
    from r3v_fast.engine import loop
    from r3v_fast.engine.grouped_sampler import GroupedPrefixSampler
    from r3v_fast.engine.sampler import HFSampler
    from r3v_fast.engine.shared_sampler import SharedPrefixSampler

    def length(key: str, branch, max_new_tokens: int) -> int:
        if "/select" in key:
            return select_tokens
        return min(max_new_tokens, forced_length(key, branch, low, high))

    class ForcedHF(HFSampler):
        def sample(self, requests, params, *, desc=None):
            self._greedy_pass = params.greedy and "eval" in (desc or "")
            return super().sample(requests, params, desc=desc)

        def _processors(self, batch, params, prompt_width):
            rows = [length(r.key, "greedy" if self._greedy_pass else b, params.max_new_tokens)
                    for r in batch for b in range(params.k)]
            return LogitsProcessorList([ForceLength(rows, self.stop_ids, prompt_width),
                                        *super()._processors(batch, params, prompt_width)])

    def budgeted(base):
        class Budgeted(base):
            def sample(self, requests, params, **kw):
                self._keys, self._with_greedy = [r.key for r in requests], False
                return super().sample(requests, params, **kw)

            def sample_and_select(self, requests, params, **kw):
                self._keys, self._with_greedy = [r.key for r in requests], True
                return super().sample_and_select(requests, params, **kw)

            def _branch_limit(self, index, branch, max_new_tokens):
                if self._with_greedy:     # branch 0 is the greedy one, then the K samples
                    branch = "greedy" if branch == 0 else branch - 1
                return length(self._keys[index], branch, max_new_tokens)

        return Budgeted

    shared_cls, grouped_cls = budgeted(SharedPrefixSampler), budgeted(GroupedPrefixSampler)
    real_make = loop.make_sampler

    def make_sampler(options, model, processor, *, show_progress=True):
        sampler = real_make(options, model, processor, show_progress=show_progress)
        cls = {HFSampler: ForcedHF, SharedPrefixSampler: shared_cls, GroupedPrefixSampler: grouped_cls}[type(sampler)]
        sampler.__class__ = cls
        if cls is not ForcedHF:
            sampler.stop_ids = []           # no stop token: every branch runs to its budget
        return sampler

    loop.make_sampler = make_sampler


def install_hash_judge() -> None:
    from dataclasses import replace

    from r3v_fast.engine.pool import Pool

    real_write = Pool.write_shard

    def write_shard(self, iteration, chunk, samples, **kwargs):
        marked = [replace(s, correct=_hash(s.question_id, s.iteration, s.index) % 2 == 0) for s in samples]
        return real_write(self, iteration, chunk, marked, **kwargs)

    Pool.write_shard = write_shard


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="bench/iteration_run.py")
    parser.add_argument("--forced-lengths", help="LO,HI new tokens per branch")
    parser.add_argument("--judge-by-hash", action="store_true")
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]
    if args.forced_lengths:
        low, high = (int(x) for x in args.forced_lengths.split(","))
        select_tokens = int(train_args[train_args.index("--select-max-new-tokens") + 1])
        install_forced_lengths(low, high, select_tokens)
    if args.judge_by_hash:
        install_hash_judge()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from r3v_fast import train

    return train.main(train_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
