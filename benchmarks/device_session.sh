#!/usr/bin/env bash
# One GPU session for the checks that need a GPU (never CI): issue 13.5 (benchmarks/gpu_check.py: Mobile V-MoE-Tiny
# vs ViT-Tiny in bfloat16, batch 1 and 256, plus GPU correctness) and issue 15.6 (benchmarks/evidence/round2/
# gpu_train.py: A at ViT-Tiny size). Sized for one call of the run tool (about 9 minutes):
#
#   here:    python benchmarks/evidence/round2/gpu_train.py pack          # runs/gpu_data/tin200.npz (47 MiB)
#            transformers 5.25 + huggingface_hub 2.4 + httpx2, trimmed to the model folders hf_vmoe imports,
#            zipped to .whl/tf525.zip (3.3 MiB; the GPU image has transformers 5.17, which hf_vmoe is not tested on)
#   device:  run tool, command "bash benchmarks/device_session.sh", carry ["runs/gpu_data", ".whl"], timeout 570
#   local dry run (CPU, seconds): GPU_TRAIN_EXTRA="--smoke --epochs 1 --seeds 42" bash benchmarks/device_session.sh
#   back:    $OUT/gpu_check.json, $OUT/gpu_a.tgz (every arm's record and log, summary.json), $OUT/session.log
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
TOTAL=${TOTAL:-550}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# transformers: the carried 5.25 (what the test suite runs on) when it imports here, else the image's own
if [[ -f .whl/tf525.zip ]]; then
  mkdir -p /tmp/tf525 && python3 -c "import zipfile; zipfile.ZipFile('.whl/tf525.zip').extractall('/tmp/tf525')"
  if PYTHONPATH="/tmp/tf525:$PYTHONPATH" python3 -c "import hf_vmoe, transformers; print('carried transformers', transformers.__version__)"; then
    export PYTHONPATH="/tmp/tf525:$PYTHONPATH"
  else
    echo "carried transformers does not import here; using the image's"
  fi
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

timeout 120 python3 benchmarks/gpu_check.py --rounds 40 --out "$OUT/gpu_check.json" || echo "gpu_check exit $?"

LEFT=$(( TOTAL - ($(date +%s) - T0) - 25 ))
echo "gpu_train budget ${LEFT}s"
timeout $(( LEFT + 15 )) python3 benchmarks/evidence/round2/gpu_train.py run --out /tmp/gpu_a --budget "$LEFT" \
  ${GPU_TRAIN_EXTRA:-} || echo "gpu_train exit $?"
tar czf "$OUT/gpu_a.tgz" -C /tmp gpu_a 2>/dev/null
echo "session $(( $(date +%s) - T0 ))s"
