#!/usr/bin/env bash
# The prepared GPU run on one H200, in two calls of under 10 minutes each (see README.md). From the repository root:
#
#   bash benchmarks/run_gpu.sh [all|check|speed|e2e|tta ...]   # stages in this order; `all`: every stage
#   SMOKE=1 bash benchmarks/run_gpu.sh      # every stage at toy sizes, on CPU too (checks the script; tested)
#
# Timeouts: check 45 s, speed 60 + 300 s, e2e 330 s, tta 180 s: `check speed` is one call, `e2e tta` the other.
# Writes into $OUT if set (the device tool brings that folder back), else benchmarks/results/:
#   <date>-<device>.json/.md       train_speed: synthetic rows + end-to-end rows (resident, memmap, nvJPEG);
#                                  the e2e stage adds `pretrain_e2e` (tlkit pretrain itself, per epoch: img/s,
#                                  data-wait fraction, top-1) and `pretrain_e2e_img_s` to the same JSON
#   <date>-<device>-tta.json/.md   time_to_accuracy: tlkit engine + GPU-resident pack vs torchvision reference
#   gpu_check.json, run_gpu.log    device-vs-CPU augmentation/decode check, the whole log
#
# Data: $TLKIT_DATA, else ./.gpudata when present (a carried copy), else tlkit's default data root.
# Needs tiny_imagenet_200 (train+val) and imagenet_sample/val (any number of its images); see README.md.
# Only torch, torchvision and timm are needed (no albumentations, no gradio); the `fit` run of
# time_to_accuracy is skipped where albumentations is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=" ${*:-all} "
want() { [[ $STAGES == *" all "* || $STAGES == *" $1 "* ]]; }
PY=${PYTHON:-python3}
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/tlkit-inductor}
if [ -z "${TLKIT_DATA:-}" ] && [ -d .gpudata ]; then export TLKIT_DATA="$PWD/.gpudata"; fi
PACKS=${TLKIT_PACKS:-/tmp/tlkit-packs}
DAY=$(date +%F)
SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
  SPEED_ARGS=(--preset smoke --tile 64); TTA_ARGS=(--smoke); CHECK_DEVICE=cpu; E2E_ARGS=(--smoke)
else
  SPEED_ARGS=(--preset gpu --tile 20000); TTA_ARGS=(--epochs 16 --batch-size 256); CHECK_DEVICE=cuda
  E2E_ARGS=(--tiny-epochs 16 --r50-epochs 3 --tile 20000)
fi
exec > >(tee -a "$RES/run_gpu.log") 2>&1

log() { echo "[$(date +%T)] $*"; }
log "stages$STAGES; results in $RES; data ${TLKIT_DATA:-default root}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
uptime
SLUG=$($PY -c "import torch; from speed import device_slug, resolve; print(device_slug(resolve('auto')))")

if want check; then
  log "device-vs-CPU check (crop_resize, decode_jpeg)"
  timeout 45 $PY -c "import json; from tlkit.data.gpu import self_check; r = self_check('$CHECK_DEVICE'); print(r); \
open('$RES/gpu_check.json', 'w').write(json.dumps(r, indent=1))" || log "check FAILED"
fi

if want speed; then
  log "pack imagenet_sample/val at 256 px"
  timeout 60 $PY -m tlkit.data.packed imagenet_sample val "$PACKS/imagenet_sample/val-256" 256 --overwrite \
    || log "packing FAILED"
  # ResNet-50 @224, batch 256: 6 synthetic rows (2 compiled), then the engine fed by real data three ways.
  # The pack's rows are tiled to 20,000 images (3.9 GB) so the memmap row reads real pages.
  log "train_speed (gpu preset)"
  timeout 300 $PY benchmarks/train_speed.py "${SPEED_ARGS[@]}" \
    --pack "$PACKS/imagenet_sample/val-256" \
    --jpeg-root imagenet_sample --jpeg-split val \
    --out "$RES/$DAY-$SLUG.json" \
    || log "train_speed FAILED or timed out"
fi

if want e2e; then
  # `tlkit data pack` + `tlkit pretrain` themselves: tiny_imagenet @64 (imagenet recipe, gpu block, 16 epochs),
  # then ResNet-50 @224 from the imagenet_sample images tiled to 20,000 and packed (3 epochs); per-epoch img/s,
  # data-wait fraction and top-1 from each run's metrics.jsonl, merged into the day's results JSON (seeded
  # from benchmarks/results/ when the speed stage ran in an earlier call and its JSON was copied back there).
  log "pretrain end to end"
  timeout 330 $PY benchmarks/pretrain_e2e.py "${E2E_ARGS[@]}" --packs "$PACKS" --runs "$PACKS/runs" \
    --out "$RES/$DAY-$SLUG.json" --seed-from "benchmarks/results/$DAY-$SLUG.json" \
    || log "pretrain_e2e FAILED or timed out"
fi

if want tta; then
  # resnet18 @64 on tiny_imagenet (20k train, 2k val), 16 epochs, batch 256, same recipe both loops.
  log "time_to_accuracy"
  timeout 180 $PY benchmarks/time_to_accuracy.py --runs reference,tlkit --loader auto "${TTA_ARGS[@]}" \
    --packs "$PACKS" --out "$RES/$DAY-$SLUG-tta.json" \
    || log "time_to_accuracy FAILED or timed out"
fi
log "done"
ls -la "$RES"
