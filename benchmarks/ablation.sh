#!/usr/bin/env bash
# The quality-transfer ablation: the default job, then one lever at a time, each row one process
# (benchmarks/transfer.py), scored on the built-in held-out split and every held-out set of another domain.
# Run it alone on the machine (rows time the model), after `bash benchmarks/install_domains.sh`:
#
#   bash benchmarks/ablation.sh minilm            # about 2-3 minutes a row on 2 cores
#   bash benchmarks/ablation.sh smollm2 default bound2 written   # named rows only (a SmolLM2 row takes 10-25 min)
#   python benchmarks/transfer_table.py benchmarks/out/transfer-minilm.jsonl
#
# Each row changes one lever of the default of the code that runs it; docs/benchmarks/transfer.md says which
# default each of its tables was measured against.
set -euo pipefail
cd "$(dirname "$0")"
model=${1:-minilm}
shift || true
declare -A ROWS=(
  [default]=""
  [docstrings]="--set calibration.source=docstrings"
  [written]="--set calibration.source=written"
  [mix]="--set calibration.source=mix"
  [cal512]="--set calibration.num_samples=512"
  [mix512]="--set calibration.source=mix --set calibration.num_samples=512"
  [len256]="--set calibration.sequence_length=256"
  [eval32]="--set search.eval_samples=32"
  [staged]="--set search.select_top=16 --set search.select_samples=64"
  [bound1.5]="--set search.max_cut_ratio=1.5"
  [bound2]="--set search.max_cut_ratio=2.0"
  [damp0.1]="--set database.dampening=0.1"
  [damp0.5]="--set database.dampening=0.5"
  [comp0.5]="--set database.compensation=0.5"
  [prior-spdy]="--set search.error_prior=spdy"
  [recovery-gap]="--set recovery.method=gap"
  [mix-recovery-gap]="--set calibration.source=mix --set recovery.method=gap"
  [mix-bound1.5]="--set calibration.source=mix --set search.max_cut_ratio=1.5"
  [mix-bound2]="--set calibration.source=mix --set search.max_cut_ratio=2.0"
  [mix-staged]="--set calibration.source=mix --set search.select_top=16 --set search.select_samples=64"
  [mix-comp0.5]="--set calibration.source=mix --set database.compensation=0.5"
  [mix-damp0.1]="--set calibration.source=mix --set database.dampening=0.1"
  [mix512-bound1.5]="--set calibration.source=mix --set calibration.num_samples=512 --set search.max_cut_ratio=1.5"
  [bound1.25]="--set search.max_cut_ratio=1.25"
  [damp0.001]="--set database.dampening=0.001"
  [stream]="--set calibration.packing=stream --set recovery.method=none"
  [documents]="--set recovery.method=none"
  [documents1024]="--set recovery.method=none --set calibration.num_samples=1024"
  [gap-e16]="--set recovery.epochs=16 --set recovery.patience=3"
  [gap256]="--set recovery.num_samples=256"
  [uniform]="--profile uniform"
  [default@1.25]="--set target_speedup=1.25"
  [uniform@1.25]="--profile uniform --set target_speedup=1.25"
  [default@2.0]="--set target_speedup=2.0"
  [uniform@2.0]="--profile uniform --set target_speedup=2.0"
  [layerwise128]="--set recovery.method=layerwise --set recovery.num_samples=128"
  [len64]="--set calibration.sequence_length=64"
  [len32]="--set calibration.sequence_length=32"
  [gap128]="--set recovery.method=gap --set recovery.num_samples=128"
  [no-fit-bias]="--set database.fit_bias=false"
  [logits-all]="--set regime.logits=all"
  [gap-e4]="--set recovery.method=gap --set recovery.epochs=4"
  [mix512-bound1.5-gap]="--set calibration.source=mix --set calibration.num_samples=512 --set search.max_cut_ratio=1.5 --set recovery.method=gap"
)
ORDER=(default docstrings written mix cal512 mix512 len256 eval32 staged bound1.5 bound2 damp0.1 damp0.5 comp0.5
       prior-spdy recovery-gap mix-recovery-gap mix-bound1.5 mix-bound2 mix-staged mix-comp0.5 mix-damp0.1
       mix512-bound1.5 mix512-bound1.5-gap bound1.25 damp0.001 gap128 len64 len32
       stream documents documents1024 gap-e16 gap256 uniform default@1.25 uniform@1.25 default@2.0 uniform@2.0
       layerwise128 no-fit-bias logits-all gap-e4)
labels=("$@")
[ ${#labels[@]} -eq 0 ] && labels=("${ORDER[@]}")
for label in "${labels[@]}"; do
  [ -v "ROWS[$label]" ] || { echo "unknown row $label; rows: ${ORDER[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086
  python transfer.py --model "$model" --label "$label" ${ROWS[$label]} \
    --output "out/transfer-$model.jsonl" 2>"out/transfer-$model-$label.log" | tail -4
done
