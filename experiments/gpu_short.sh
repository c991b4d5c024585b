#!/usr/bin/env bash
# The short GPU session behind the GPU rows of experiments/{iddpm_nll,ddim_table,cfg_tradeoff}/RESULTS.md, on one
# H100 in under 10 minutes: three models (L_simple DDPM, L_hybrid Improved DDPM, class-conditional CFG; preset
# GPU_SHORT of experiments/common.py, 4 minutes of training each) train side by side, then the three studies
# evaluate them side by side. Logs and results go to logs/$PRESET/ and, when $OUT is set, $OUT/results.tgz.
#     bash experiments/gpu_short.sh                 # on the GPU: N=500 samples per cell, 10000 real images
#     PRESET=smoke bash experiments/gpu_short.sh    # the same pipeline in miniature on a CPU (a few minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-gpu_short}
if [[ $PRESET == smoke ]]; then N=40 REAL=200; else N=500 REAL=10000; fi
LOG=logs/$PRESET
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
collect() {  # everything small worth keeping, into one archive (also when the run is cut short)
    [[ -n "${OUT:-}" ]] || return 0
    tar czf "$OUT/results.tgz.tmp" "$LOG" experiments/*/results.json experiments/*/RESULTS_*.json \
        experiments/*/*.png logs/iddpm_nll/$PRESET/*/samples/samples.png logs/cfg_tradeoff/$PRESET/samples/samples.png \
        logs/iddpm_nll/$PRESET/samples/*.npz logs/iddpm_nll/$PRESET/*/csv logs/cfg_tradeoff/$PRESET/csv \
        logs/iddpm_nll/$PRESET/*/.hydra logs/cfg_tradeoff/$PRESET/.hydra \
        2>/dev/null
    mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}
(while sleep 30; do collect; done) &
collector=$!
nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1

iddpm=("$PY" experiments/iddpm_nll/run.py --scale $PRESET)
"${iddpm[@]}" --train-only --only simple > "$LOG/train_simple.log" 2>&1 &
simple=$!
"${iddpm[@]}" --train-only --only hybrid > "$LOG/train_hybrid.log" 2>&1 &
hybrid=$!
"$PY" experiments/cfg_tradeoff/run.py --preset $PRESET --train "model=cfg net.use_scale_shift_norm=true" \
    --run-dir logs/cfg_tradeoff/$PRESET --num-samples "$N" --num-real $REAL > "$LOG/cfg.log" 2>&1 &
cfg=$!
wait $simple $hybrid
"$PY" experiments/ddim_table/run.py --run-dir logs/iddpm_nll/$PRESET/simple --steps 10 20 50 100 1000 \
    --preset "$PRESET" --train "model=ddpm schedule=cosine" --num-samples "$N" --num-real $REAL > "$LOG/ddim.log" 2>&1 &
ddim=$!
("${iddpm[@]}" && "${iddpm[@]}" --fid) > "$LOG/iddpm.log" 2>&1 &
nll=$!
wait $cfg $ddim $nll
kill $collector
collect
