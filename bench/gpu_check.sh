#!/usr/bin/env bash
# One-shot GPU check of every kernel and fast path, for a session that has a CUDA machine:
#   bash bench/gpu_check.sh            (from the repository root or anywhere)
# 1. installs, without network: the peers' wheels found in .whl/ (liger-kernel,
#    cut-cross-entropy; .whl/ is git-ignored, so carry it to the machine), then this package
#    (editable, no build isolation; the C++ extension is optional);
# 2. runs the fused losses' tests on the GPU (every test of tests/ops/test_segment_logprob.py
#    and tests/ops/test_weighted_nll.py runs on CUDA tensors there: fp32/fp16/bf16, int64
#    offsets, no-sync checks, Inductor, bf16 dW over many chunks);
# 3. runs the GPU benchmark (token_logprob, weighted_nll and its frozen-head row, the peers,
#    the single-product floor) and the per-kernel profile of both fused losses;
# 4. runs the cascade attention and sampler tests on CUDA, and their GPU benchmarks (the sampler
#    benchmark: continuous shared vs grouped vs hf on the Qwen2-VL-2B shape, forced lengths
#    uniform 64-384, K = 8; results in bench/results/sampler.json);
# 5. runs the tree-packing tests and benchmark;
# 6. runs `python -m r3v_fast.train --preset smoke` under FSDP2 with one process
#    (configs/accelerate/fsdp.yaml) and loads its checkpoint with plain transformers;
# 7. times one whole R³V iteration, phase by phase, r3v_fast vs the public-style pipeline on a
#    Qwen2-VL-2B-shaped workload (bench/bench_iteration.py -k gpu; results in
#    bench/results/iteration.json). R3V_GPU_CHECK_SKIP_ITERATION=1 leaves it out.
# R3V_GPU_CHECK_ONLY=fused_loss stops after step 3 (the sampler and packing checks take minutes).
# Writes bench/results/<device>.json, bench/results/gpu_tests.xml, bench/results/gpu_check.log.
# Exit status: non-zero if the install, a test or a benchmark failed (the later steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
LOG=bench/results/gpu_check.log
exec > >(tee "$LOG") 2>&1
status=0

python - <<'EOF' || { echo "gpu_check: no CUDA device visible to torch"; exit 1; }
import torch, triton
assert torch.cuda.is_available()
print("gpu_check:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

echo "== install (offline)"
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    # `python -m pip`: the bare `pip` on the PATH may belong to another interpreter. Into a
    # --target folder on PYTHONPATH, so that a read-only or system site-packages does not matter.
    python -m pip install --no-index --no-deps --no-compile --quiet --upgrade --target /tmp/r3v_peers "${wheels[@]}" \
        && export PYTHONPATH="/tmp/r3v_peers${PYTHONPATH:+:$PYTHONPATH}" \
        || echo "gpu_check: peer wheels did not install"
    python -c "import liger_kernel.transformers.functional" || echo "gpu_check: liger_kernel does not import"
    python -c "import cut_cross_entropy" || echo "gpu_check: cut_cross_entropy does not import"
else
    echo "gpu_check: no .whl/ wheels: liger / cut-cross-entropy will be skipped"
fi
if ! python -m pip install --no-index --no-deps --no-build-isolation --quiet -e .; then
    echo "gpu_check: editable install with the C++ extension failed; retrying without it"
    R3V_NO_CPP=1 python -m pip install --no-index --no-deps --no-build-isolation --quiet -e . || true
fi
if ! python -c "import r3v_fast.kernels.segment_logprob" 2>/dev/null; then
    # Last resort on this throw-away copy: make kernels/ importable as r3v_fast.kernels.
    echo "gpu_check: package not installed; linking r3v_fast/kernels -> kernels"
    ln -sfn ../kernels r3v_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import r3v_fast.ops, r3v_fast.kernels.segment_logprob" || exit 1

echo "== GPU tests"
python -m pytest tests/ops/test_segment_logprob.py tests/reference/test_segment_logprob.py \
    tests/ops/test_weighted_nll.py tests/reference/test_weighted_nll.py -q -rs \
    -p no:cacheprovider --junitxml=bench/results/gpu_tests.xml || status=1

echo "== GPU benchmark"
python -m pytest bench/bench_segment_logprob_gpu.py -q -s -rs -p no:cacheprovider \
    --benchmark-json=bench/results/gpu_pytest_benchmark.json || status=1

echo "== per-kernel profile of the fused losses (R3V_PROFILE_VARIANTS / R3V_PROFILE_WNLL_VARIANTS=all for every variant)"
R3V_PROFILE_VARIANTS="${R3V_PROFILE_VARIANTS:-default,first}" \
R3V_PROFILE_WNLL_VARIANTS="${R3V_PROFILE_WNLL_VARIANTS:-default,chunk256,chunk384,chunk1024,row8192}" \
    python bench/profile_segment_logprob_gpu.py || status=1

if [[ "${R3V_GPU_CHECK_ONLY:-}" == "fused_loss" ]]; then
    echo "== done (fused loss only, status $status); results:"
    ls -l bench/results
    exit $status
fi

echo "== cascade decode attention (dense + paged) + samplers (continuous, grouped, hf)"
python -m pytest tests/ops/test_cascade_attention.py tests/model/test_prefix_cache.py tests/model/test_paged_cache.py \
    tests/engine/test_sampler.py tests/engine/test_shared_sampler.py tests/engine/test_grouped_sampler.py \
    -q -rs -p no:cacheprovider || status=1
# GPU parts only: the CPU sampler benchmark (shipped tiny model, natural lengths) runs on the CPU machine.
python -m pytest bench/bench_cascade_attention.py bench/bench_sampler.py -k gpu -q -s -rs -p no:cacheprovider \
    || status=1

echo "== tree packing"
python -m pytest tests/model/test_tree_attention.py tests/engine/test_packing.py tests/test_scoring.py \
    -q -rs -p no:cacheprovider || status=1
python -m pytest bench/bench_packing.py -q -s -rs -p no:cacheprovider || status=1

echo "== FSDP2 on the GPU: one process, configs/accelerate/fsdp.yaml, shipped tiny model, smoke preset"
# The CUDA path of FSDP (accelerate sets it up itself; no CPU override), bf16 mixed precision:
# train, save and merge the checkpoint, sample from it. The run directory is thrown away.
rm -rf /tmp/r3v_fsdp_gpu
accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
    -m r3v_fast.train --preset smoke --run-dir /tmp/r3v_fsdp_gpu --progress false --save-every 2 \
    && python - <<'PY' || status=1
import json
from transformers import AutoModelForImageTextToText
records = [json.loads(line) for line in open("/tmp/r3v_fsdp_gpu/metrics.jsonl")]
train = next(r for r in records if r["phase"] == "train")
assert train.get("fsdp_units", 0) > 1, train
AutoModelForImageTextToText.from_pretrained("/tmp/r3v_fsdp_gpu/checkpoints/iter_001")
print("gpu_check: FSDP run ok:", train["fsdp_units"], "FSDP units,", train["steps"], "steps,",
      "peak", train["peak_memory_bytes"] / 2**20, "MiB")
PY
[[ -f /tmp/r3v_fsdp_gpu/metrics.jsonl ]] || status=1

if [[ -z "${R3V_GPU_CHECK_SKIP_ITERATION:-}" ]]; then
    echo "== one R³V iteration, phase by phase (r3v_fast vs public-style, Qwen2-VL-2B shape)"
    python -m pytest bench/bench_iteration.py -k gpu -q -s -rs -p no:cacheprovider || status=1
fi

echo "== done (status $status); results:"
ls -l bench/results
exit $status
