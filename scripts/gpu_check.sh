#!/usr/bin/env bash
# The checks that need a GPU, in one script that finishes in under 8 minutes on one H200.
# Made for a machine with torch and transformers but no Ray, no vLLM and no network, so it
# installs nothing from outside: offpolicy goes in with --no-deps (or, where pip cannot do
# that offline, runs from the source tree: offpolicy/actors, learner and buffer link to the
# role folders, so the repository root on PYTHONPATH is the whole package).
#
#   bash scripts/gpu_check.sh            # on the GPU machine, from the repository root
#   DEVICE=cpu bash scripts/gpu_check.sh # a dry run of the same steps on a CPU
#   NO_INSTALL=1 ...                     # run from the source tree without pip
#
# 1. a serial-mode (resources.serial) quickstart run with the learner on the GPU;
# 2. benchmarks/learner_memory.py --device cuda: the learner on SmolLM2-135M's shape,
#    unsharded (fp32) and with learner.sharding=fsdp over NCCL (world size 1) in bf16 mixed
#    precision: memory, step time and tokens/s.
# Output goes to stdout and, when $OUT is set (the device tool's folder), to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())"
python -c "import ray" 2>/dev/null && echo "ray: installed" || echo "ray: not installed"
python -c "import vllm" 2>/dev/null && echo "vllm: installed" || echo "vllm: not installed"

step "install offpolicy without dependencies"
if [ -n "${NO_INSTALL:-}" ] || ! pip install -q --no-deps --no-build-isolation --no-index -e . 2>/dev/null; then
    echo "pip could not install offline; running from the source tree"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import offpolicy.learner.sharding, offpolicy.runtime.launch; print('offpolicy imports')" || exit 1

export OFFPOLICY_CACHE=${OFFPOLICY_CACHE:-/tmp/offpolicy-gpu-cache}
GPUS=$([ "$DEVICE" = cuda ] && echo 1 || echo 0)

step "1. serial-mode quickstart run, learner on $DEVICE (120 steps)"
timeout 300 python -m offpolicy.tools.cli train configs/quickstart.yaml resources.serial=true \
    resources.learner_gpus=$GPUS learner.steps=120 eval.every=60 \
    run.dir=/tmp/gpu-check-run run.overwrite=true
echo "exit $?"
python - <<'EOF'
import json
s = json.load(open("/tmp/gpu-check-run/summary.json"))
print(f"serial run: eval {s['base_eval_reward']:.3f} -> {s['final_eval_reward']:.3f} in "
      f"{s['wall_s']:.0f} s, {s['samples_per_s']:.0f} samples/s")
EOF

step "2. learner memory and tokens/s on SmolLM2-135M's shape: unsharded vs FSDP (bf16)"
timeout 300 python benchmarks/learner_memory.py --device "$DEVICE" ${BENCH_ARGS:---rows 16 --steps 5}
echo "exit $?"

step "done"
