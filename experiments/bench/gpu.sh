#!/usr/bin/env bash
# The GPU run of experiments/bench/RESULTS.md: the four run.py commands at the issue's anchor conditions, one
# JSONL file each (plus the stderr, nvidia-smi and versions) in $OUT (else logs/bench). Name the runs to do only
# some of them (each compiles several times; split them over device calls that have a 10-minute limit):
#     bash experiments/bench/gpu.sh                      # anchor fast cudagraphs same_levers
#     bash experiments/bench/gpu.sh fast cudagraphs
#     SMOKE=1 bash experiments/bench/gpu.sh              # the same runs in miniature on a CPU (~9 minutes of Inductor)
#     NET=dit_s2 CHANNELS=4 bash experiments/bench/gpu.sh anchor fast   # a DiT (32x32x4) vs DiTTransformer2DModel
# The device image lacks hydra/omegaconf/diffusers: bash ../shared/device/prepare-wheels.sh diffusers==0.42.1,
# carry .whl, and install it first as that script prints.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=${OUT:-logs/bench}
mkdir -p "$DEST"
if [[ -n ${SMOKE:-} ]]; then
    base=(--net unet_s --device cpu --batch-size 2 --image-size 16 --channels 1 --train-steps 1 --warmup-steps 1
          --sample-batch-size 2 --sample-steps 1)
    acc=2
else
    base=(--net "${NET:-unet_m}" --channels "${CHANNELS:-3}" --device cuda --precision bf16 --batch-size 128
          --train-steps 50 --warmup-steps 10 --sample-batch-size 512 --sample-steps 20)
    acc=300
    nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1
fi
"$PY" -c "import torch, lightning, diffusers
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__,
      'diffusers', diffusers.__version__)" > "$DEST/versions.txt" 2>&1
fast=(--channels-last --data-on-device --fused-optimizer)
declare -A runs=(
    [anchor]="--accuracy-steps $acc"
    [fast]="--compile ${fast[*]} --accuracy-steps $acc"
    [cudagraphs]="--compile reduce-overhead ${fast[*]} --accuracy-steps $acc"
    [same_levers]="--compile --channels-last --fused-optimizer --peer-levers same --skip-lightning --accuracy-steps 0"
)
status=0
for name in "${@:-anchor fast cudagraphs same_levers}"; do
    for run in $name; do
        [[ -n ${runs[$run]:-} ]] || { echo "unknown run '$run' (anchor fast cudagraphs same_levers)"; exit 2; }
        # shellcheck disable=SC2086  # the flags split on purpose
        file="$DEST/${NET:+${NET}_}$run"
        "$PY" experiments/bench/run.py "${base[@]}" --peer diffusers ${runs[$run]} > "$file.jsonl" 2> "$file.err"
        rc=$?
        echo "== $run: rc=$rc"
        tail -n 1 "$file.jsonl"
        [[ $rc == 0 ]] || { status=$rc; tail -n 20 "$file.err"; }
    done
done
exit $status
