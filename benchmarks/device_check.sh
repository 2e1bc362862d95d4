#!/usr/bin/env bash
# Issue 14's GPU measurements in one prepared run, for a session (or a user) with one GPU machine.
#
#   bash benchmarks/device_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash benchmarks/device_check.sh   # a dry run of the same steps on a CPU (seconds)
#
# Needs only auxnb's core dependencies (torch, torchvision, numpy, pandas, scikit-learn, tqdm) and no
# dataset: the image settings run on the fixture files auxnb writes (the real formats and shapes).
# Each step has its own time limit and writes its output to $OUT/<step>.txt (default
# /tmp/auxnb-device); a step that fails or times out is reported and the next one runs. What each
# step measures, and the goal it is compared with (issue 14):
#   throughput-*   Trainer (STL) vs a plain PyTorch loop, same model/data/optimiser: time per step ratio,
#                  ConvNet4 on CIFAR shapes and ResNet18 on 224x224, fp32 and amp=bf16 (goal <= 1.05)
#   packing        12 ConvNet4 runs (CIFAR shapes) one after another vs packed 4 per GPU
#                  (`--executor processes --runs-per-gpu 4`): packed / sequential wall time (goal <= 1/3)
#   plan           `python -m auxnb plan` of MAOAL Table 1's CIFAR-10 column on the GPU: seconds per step
#                  and CUDA peak memory per (setting, method)
#   cost-model     the upper step's passes of MAOAL/JTDS/DTG counted and timed on the GPU (in Equal steps), JTDS
#                  also with its last product by double backward (`jtds-vjp`): P of the two rows is what
#                  `forward_mode` saves there, and a HypergradWarning in the output means CUDA fell back
# The steps' limits add up to 15 minutes; how long the run takes on a GPU has not been measured (no
# GPU has been lent to this project so far). The CPU dry run took 5 minutes on this project's 2-core machine.
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
OUT=${OUT:-/tmp/auxnb-device}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 AUXNB_DEVICE="$DEVICE" MPLBACKEND=Agg

if [ "$QUICK" = 1 ]; then
    CONV="--steps 3 --repeats 1 --n 64 --batch 16"; RES="--steps 2 --repeats 1 --n 16 --batch 4"
    PACK="--seeds 2 --steps 4 --batch-size 8 --jobs 2 --overhead-runs 1"; COST="--repeats 1 --steps 10"
    PLAN="--probe-steps 1 --methods stl,maoal"
else
    CONV="--steps 50 --repeats 3 --n 4096 --batch 128"; RES="--steps 20 --repeats 3 --n 512 --batch 64"
    PACK="--seeds 6 --steps 300 --batch-size 256 --jobs 4 --runs-per-gpu 4 --overhead-runs 4"; COST="--repeats 2"
    PLAN="--probe-steps 3"
fi

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 12 "$OUT/$name.txt"
    echo "-- $name: exit $rc after $((SECONDS - t0)) s"
}

step env 60 $PY -c "import torch, auxnb; print('torch', torch.__version__, 'auxnb', auxnb.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
step throughput-convnet4 90 $PY benchmarks/throughput.py --device "$DEVICE" $CONV
step throughput-resnet18 120 $PY benchmarks/throughput.py --shape resnet18 --device "$DEVICE" $RES
if [ "$DEVICE" != cpu ]; then  # bf16 on a CPU is emulated and slow: only the GPU's figures mean anything
    step throughput-convnet4-bf16 90 $PY benchmarks/throughput.py --device "$DEVICE" --amp bf16 $CONV
    step throughput-resnet18-bf16 120 $PY benchmarks/throughput.py --shape resnet18 --device "$DEVICE" --amp bf16 $RES
fi
step packing 180 $PY benchmarks/sweep_packing.py --setting cifar10-rotation --scale smoke --methods stl,equal \
    --device "$DEVICE" --no-ray $PACK
step plan 120 $PY -m auxnb plan maoal-table1 --settings cifar10-rotation --device "$DEVICE" $PLAN
step cost-model 120 $PY benchmarks/step_cost.py --cost-model --methods maoal,jtds,jtds-vjp,dtg --device "$DEVICE" $COST
echo "outputs in $OUT"
