#!/usr/bin/env bash
# Round 2, A on a GPU (issue 15, item 6): the paper's ViT-Tiny size, mobile-vmoe-12x192 vs vit-12x192, on the same
# 200-class Tiny-ImageNet split as the CPU runs (train 18,000 / held-out 2,000 / validation 10,000), 64 px with
# patch 4 (16 x 16 = 256 patches, the token count of 224 px with patch 14), E=10, k=1, last 2 of 12 blocks.
# PREPARED, NOT RUN (no device was lent to the task that wrote it). One seed: a scouting result, labelled as such.
#
#   here:    bash benchmarks/evidence/round2/gpu_run.sh pack
#            -> runs/gpu_data/tin200.zip (the split's real files, stored uncompressed: ~59 MiB, under the run
#               tool's 64 MiB carry limit; a tar is ~80 MiB from its 512-byte blocks per 2 KB file; runs/ is
#               git-ignored; the device copy of the work tree has no ../shared/data, so the data is carried)
#   device:  the run tool with  command "bash benchmarks/evidence/round2/gpu_run.sh device"
#            carry ["runs/gpu_data"], timeout_s 570 (everything below is budgeted to finish in ~9 minutes)
#   results: $OUT/gpu_round2/<run>/{all_results.json,trainer_state.json,superclasses.json,log.txt}, summary.json
#
# Sequence on the device: dense vit-12x192 (EPOCHS), then its super-classes from the held-out 2,000 (soft
# confusion, 10 balanced groups), then three Mobile V-MoE arms IN PARALLEL on the one GPU (confusion super-class
# router / WordNet super-class router / learned router), then a summary. Same optimiser, schedule, augmentation,
# seed and data order (--data_seed) for every arm. Epochs are fixed (EPOCHS, default 30): there is no time on the
# device for the CPU plan's scouting run, so the GPU result does not follow the epoch rule (PROTOCOL.md says so).
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=benchmarks/evidence/round2
MODE=${1:-device}
EVD2=${EVD2:-/tmp/evd2}

if [[ $MODE == pack ]]; then
  python "$HERE/prepare_data.py" --evd2 "$EVD2"
  mkdir -p runs/gpu_data
  python - "$EVD2" <<'PACK'
import sys, zipfile
from pathlib import Path
root = Path(sys.argv[1])
with zipfile.ZipFile("runs/gpu_data/tin200.zip", "w", zipfile.ZIP_STORED) as z:
    for part in ("train", "heldout", "validation"):
        for f in sorted((root / "tin200" / part).glob("*/*.JPEG")):
            z.write(f.resolve(), f"tin200/{part}/{f.parent.name}/{f.name}")
PACK
  ls -l runs/gpu_data/tin200.zip
  exit 0
fi
[[ $MODE == device ]] || { echo "usage: gpu_run.sh pack|device" >&2; exit 2; }

T0=$(date +%s)
BUDGET=${BUDGET:-540}            # seconds for everything, under the run tool's timeout
EPOCHS=${EPOCHS:-30}
SEED=${SEED:-42}
OUT=${OUT:-/tmp/gpu_out}
RES="$OUT/gpu_round2"
WORK=/tmp/gpu_round2
mkdir -p "$RES" "$WORK"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# ---- environment: no network on the device, so only what is there ------------------------------------------------
PY=${PY:-python3}
[[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF' | tee "$RES/env.txt"
import torch, transformers, datasets, evaluate, scipy
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "datasets", datasets.__version__)
assert torch.cuda.is_available(), "no CUDA device"
import hf_vmoe; print("hf_vmoe", hf_vmoe.__file__)
EOF

# ---- data ------------------------------------------------------------------------------------------------------------
[[ -f runs/gpu_data/tin200.zip ]] || { echo "runs/gpu_data/tin200.zip missing: run 'gpu_run.sh pack' here and carry runs/gpu_data" >&2; exit 3; }
"$PY" -c "import zipfile, sys; zipfile.ZipFile('runs/gpu_data/tin200.zip').extractall(sys.argv[1])" "$WORK"
TIN="$WORK/tin200"
echo "data: $(find "$TIN/train" -name '*.JPEG' | wc -l) train, $(find "$TIN/heldout" -name '*.JPEG' | wc -l) held-out, $(find "$TIN/validation" -name '*.JPEG' | wc -l) validation"

COMMON=(--image_size 64 --patch_size 4 --train_dir "$TIN/train" --validation_dir "$TIN/validation" --do_train --do_eval
  --num_train_epochs "$EPOCHS" --per_device_train_batch_size 128 --per_device_eval_batch_size 512 --learning_rate 1e-3
  --weight_decay 0.05 --warmup_steps 0.05 --lr_scheduler_type cosine --eval_strategy epoch --save_strategy no
  --logging_steps 20 --report_to none --tf32 true --seed "$SEED" --data_seed "$SEED")
MOBILE=(--preset mobile-vmoe-12x192)

train() {  # name, workers, args...
  local name=$1 workers=$2; shift 2
  local s; s=$(date +%s)
  local rc=0
  timeout "$(left)" "$PY" examples/run_image_classification.py "$@" "${COMMON[@]}" --dataloader_num_workers "$workers" \
    --output_dir "$WORK/$name" > "$WORK/$name.log" 2>&1 || rc=$?
  mkdir -p "$RES/$name"
  cp "$WORK/$name.log" "$RES/$name/log.txt"
  for f in all_results.json trainer_state.json config.json; do [[ -f $WORK/$name/$f ]] && cp "$WORK/$name/$f" "$RES/$name/"; done
  printf '{"name": "%s", "rc": %d, "wall_s": %d, "command": "%s"}\n' "$name" "$rc" $(( $(date +%s) - s )) \
    "examples/run_image_classification.py $* ${COMMON[*]}" >> "$RES/commands.jsonl"
  echo "$name rc=$rc $(( $(date +%s) - s ))s, $(left)s left"
  return $rc
}

train gpu-dense 12 --preset vit-12x192
timeout "$(left)" "$PY" -m hf_vmoe.cli superclasses from-model --model "$WORK/gpu-dense" --validation-dir "$TIN/heldout" \
  --num-experts 10 --soft --seed 0 --output "$RES/gpu-dense/superclasses.json" > "$RES/gpu-dense/superclasses.log" 2>&1
# the three MoE arms at once: one GPU (139 GiB) holds them easily; 16 CPU cores feed them with 4 workers each
train gpu-moe-conf 4 "${MOBILE[@]}" --superclasses_file "$RES/gpu-dense/superclasses.json" --train_routing router &
P1=$!
train gpu-moe-wordnet 4 "${MOBILE[@]}" --superclasses_file "$HERE/wordnet_superclasses.json" --train_routing router &
P2=$!
train gpu-moe-learned 4 "${MOBILE[@]}" &
P3=$!
wait $P1 || true; wait $P2 || true; wait $P3 || true

"$PY" - "$RES" <<'EOF'
import json, sys
from pathlib import Path
res = Path(sys.argv[1]); out = {}
for d in sorted(p for p in res.iterdir() if p.is_dir()):
    f = d / "all_results.json"
    if f.is_file():
        r = json.loads(f.read_text())
        out[d.name] = {k: r.get(k) for k in ("eval_accuracy", "eval_loss", "train_runtime", "epoch")}
        out[d.name].update({k: v for k, v in r.items() if "superclass" in k or "expert_load_m" in k})
dense = out.get("gpu-dense", {}).get("eval_accuracy")
for name, r in out.items():
    if dense is not None and r.get("eval_accuracy") is not None and name != "gpu-dense":
        r["minus_dense_points"] = round(100 * (r["eval_accuracy"] - dense), 2)
(res / "summary.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
EOF
echo "total $(( $(date +%s) - T0 ))s"
