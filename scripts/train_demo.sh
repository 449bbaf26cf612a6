#!/usr/bin/env bash
# Train the bundled demo ensemble cxr-demo-nih14 on the 500 NIH ChestX-ray14 images, the paper's way:
# one patient-disjoint stratified split (saved), DenseNet-121 + EfficientNet-B0 + MobileNet-V3-Large trained from
# scratch (Adam 1e-4, weighted BCE, augmentation, early stopping), CTP ensemble with thresholds tuned on the
# validation part, evaluation on the test part with the report written into the ensemble directory.
# Research software: NOT FOR CLINICAL USE.
#
#   DATA=/path/to/nih-cxr14-621 OUT=out/demo DEVICE=cuda EPOCHS=350 scripts/train_demo.sh
#
# Needs only python3 with torch, torchvision, numpy, pandas, scikit-learn, matplotlib, tqdm (tensorboard
# optional): `python` is whatever python3 is on PATH (or $PYTHON), the repository goes on PYTHONPATH.
# Re-running continues: a finished run (run.json) is kept, an interrupted one (last.pt) is resumed.
# Tiny CPU check: EPOCHS=1 IMAGE_SIZE=64 MAX_IMAGES=48 BATCH_SIZE=8 WORKERS=0 BOOTSTRAP=50 scripts/train_demo.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-$REPO/../shared/data/nih-cxr14-621}"
OUT="${OUT:-$REPO/out/demo-train}"
DEVICE="${DEVICE:-auto}"
EPOCHS="${EPOCHS:-350}"
IMAGE_SIZE="${IMAGE_SIZE:-224}"
BATCH_SIZE="${BATCH_SIZE:-32}"
WORKERS="${WORKERS:-4}"
PATIENCE="${PATIENCE:-25}"
MAX_IMAGES="${MAX_IMAGES:-}"
BOOTSTRAP="${BOOTSTRAP:-1000}"
SEED="${SEED:-0}"
NAME="${NAME:-cxr-demo-nih14}"
VERSION="${VERSION:-1.0.0}"
ARCHS="${ARCHS:-densenet121 efficientnet_b0 mobilenet_v3_large}"
PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$OUT/.mpl}"
mkdir -p "$OUT/runs" "$MPLCONFIGDIR"
SPLIT="$OUT/split.json"
ENSEMBLE="$OUT/$NAME"
log() { echo "[train_demo $(date +%H:%M:%S)] $*" >&2; }

if [[ ! -f "$SPLIT" ]]; then
  log "making the split -> $SPLIT"
  "$PYTHON" - "$DATA" "$SPLIT" "$SEED" <<'EOF'
import sys
from pathlib import Path
from training.data.load import load_dataset
from training.splits import make_split
ds = load_dataset(Path(sys.argv[1]))
make_split(ds, fractions=(0.7, 0.1, 0.2), seed=int(sys.argv[3])).save(Path(sys.argv[2]))
EOF
fi

RUNS=()
for arch in $ARCHS; do
  run="$OUT/runs/$arch"
  RUNS+=("$run")
  if [[ -f "$run/run.json" ]]; then
    log "$arch already trained ($run/run.json): skipped"
    continue
  fi
  extra=()
  [[ -f "$run/last.pt" ]] && extra+=(--resume)
  [[ -n "$MAX_IMAGES" ]] && extra+=(--max-images "$MAX_IMAGES")
  log "training $arch -> $run ${extra[*]:-}"
  "$PYTHON" -m training.train --data "$DATA" --split "$SPLIT" --out "$run" --arch "$arch" \
    --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" --image-size "$IMAGE_SIZE" --patience "$PATIENCE" \
    --workers "$WORKERS" --device "$DEVICE" --seed "$SEED" "${extra[@]}"
done

log "building the ensemble $NAME $VERSION -> $ENSEMBLE"
"$PYTHON" -m cxr.cli.train_cmds ensemble --runs "${RUNS[@]}" --data "$DATA" --split "$SPLIT" --out "$ENSEMBLE" \
  --name "$NAME" --version "$VERSION" --device "$DEVICE" --workers "$WORKERS" \
  --description "Demo ensemble (CTP) of $ARCHS trained from scratch at ${IMAGE_SIZE} px on 500 NIH ChestX-ray14 images. Research and demonstration only. NOT FOR CLINICAL USE."

log "evaluating on the test part -> $ENSEMBLE/report.md"
"$PYTHON" -m cxr.cli.train_cmds evaluate --model "$ENSEMBLE" --data "$DATA" --split "$SPLIT" --part test \
  --out "$ENSEMBLE" --bootstrap "$BOOTSTRAP" --device "$DEVICE" --workers "$WORKERS"
log "done: $ENSEMBLE (copy it to model_store/$NAME with: python -m cxr.cli.train_cmds export --ensemble $ENSEMBLE --out model_store/$NAME)"
