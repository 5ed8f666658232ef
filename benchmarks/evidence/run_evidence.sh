#!/usr/bin/env bash
# Evidence on real data (issue 8): the exact commands behind benchmarks/evidence/RESULTS.md.
#
# Usage:  bash benchmarks/evidence/run_evidence.sh prepare        # 20-class Tiny-ImageNet subset -> $EVD/tin20
#         bash benchmarks/evidence/run_evidence.sh <run-name>     # one training (names below)
#         bash benchmarks/evidence/run_evidence.sh lane_cls       # the classification runs, in order
#         bash benchmarks/evidence/run_evidence.sh lane_seg       # the segmentation runs, in order
#         SEED=43 SUF=-s2 bash benchmarks/evidence/run_evidence.sh <run-name>   # a second seed (third: 44, -s3)
# Then:   python benchmarks/evidence/collect.py                   # JSON + markdown tables + plots
# What was run for RESULTS.md: lane_cls and lane_seg with seed 42; every run again with SEED=43 SUF=-s2;
# every run (not cls-superclasses) again with SEED=44 SUF=-s3. Two trainings at a time, each with
# OMP_NUM_THREADS=1. Seeds 43 / 44 reuse the super-classes computed from the seed-42 dense model.
#
# Runs go to $EVD/runs/<name> (checkpoints stay out of the repo). Every run: 1 CPU thread, seed $SEED.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${HF_VMOE_REAL_DATA:-../shared/data}
EVD=${EVD:-/tmp/evd}
SEED=${SEED:-42}
SUF=${SUF:-}                      # run-name suffix, e.g. "-s2" for a second seed
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}

# ---- classification: Tiny-ImageNet-200, every 10th class (20 classes, 2000 train / 1000 val images), 64 px
CLS_DATA=(--train_dir "$EVD/tin20/train" --validation_dir "$EVD/tin20/validation")
CLS_COMMON=(--image_size 64 --patch_size 8 --do_train --do_eval --num_train_epochs 12
  --per_device_train_batch_size 64 --per_device_eval_batch_size 128 --learning_rate 1e-3 --weight_decay 0.05
  --warmup_steps 0.05 --lr_scheduler_type cosine --eval_strategy epoch --save_strategy no --logging_steps 5
  --use_cpu --report_to none --dataloader_num_workers 0 --seed "$SEED")
# Mobile V-MoE: last 2 of 6 blocks are MoE, E=4 experts of the dense MLP width (384), k=1 per image, one shared
# image router on the mean patch token (the preset's defaults), so active FLOPs = dense + router (2 x 96 x 4).
MOBILE=(--preset mobile-vmoe-6x96 --config_overrides "num_experts=4")
# ViMoE style: token routing, E=4 experts of half width (192), k=1, plus a shared expert of half width (192):
# active MLP width 384 = the dense MLP, + a token router.
TOKEN=(--preset mobile-vmoe-6x96 --config_overrides
  "routing_level=token,num_experts=4,num_experts_per_tok=1,moe_intermediate_size=192,num_shared_experts=1,shared_expert_intermediate_size=192,shared_router=false")

# ---- segmentation: CamVid (ADE layout, 11 classes, 0 -> ignore), 128 x 128 crops, linear head, 6 x 96 ViT
SEG_COMMON=(--train_dir "$DATA/camvid-ade" --validation_dir "$DATA/camvid-ade" --reduce_labels --crop_size 128
  --min_scale 0.75 --max_scale 1.5 --head linear
  --config_overrides "hidden_size=96,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384,patch_size=8"
  --do_train --do_eval --num_train_epochs 12 --per_device_train_batch_size 8 --per_device_eval_batch_size 16
  --learning_rate 1e-3 --weight_decay 0.05 --warmup_steps 0.05 --lr_scheduler_type cosine --eval_strategy epoch
  --save_strategy no --logging_steps 5 --use_cpu --report_to none --dataloader_num_workers 0 --seed "$SEED"
 )

run() {  # name, then the script's arguments
  local name=$1; shift
  mkdir -p "$EVD/runs"
  echo "== $(date -u +%FT%TZ) start $name: $*" >>"$EVD/commands.log"
  local rc=0
  "$PY" "$@" --output_dir "$EVD/runs/$name" >"$EVD/runs/$name.log" 2>&1 || rc=$?
  echo "== $(date -u +%FT%TZ) end $name rc=$rc" >>"$EVD/commands.log"
}

case "${1:-}" in
  prepare)
    mkdir -p "$EVD/tin20/train" "$EVD/tin20/validation"
    for c in $(ls "$DATA/tiny-imagenet-200-subset/train" | awk 'NR % 10 == 1'); do
      cp -r "$DATA/tiny-imagenet-200-subset/train/$c" "$EVD/tin20/train/"
      cp -r "$DATA/tiny-imagenet-200-subset/validation/$c" "$EVD/tin20/validation/"
    done ;;
  cls-dense)
    run cls-dense$SUF examples/run_image_classification.py --preset vit-6x96 "${CLS_DATA[@]}" "${CLS_COMMON[@]}" ;;
  cls-superclasses)  # super-classes from the dense model's confusion matrix on the TRAINING images (no val leak)
    .venv/bin/hf-vmoe superclasses from-model --model "$EVD/runs/cls-dense" --validation-dir "$EVD/tin20/train" \
      --num-experts 4 --soft --output "$EVD/runs/superclasses.json" >"$EVD/runs/superclasses.log" 2>&1 ;;
  cls-moe-superclass)
    run cls-moe-superclass$SUF examples/run_image_classification.py "${MOBILE[@]}" \
      --superclasses_file "$EVD/runs/superclasses.json" --train_routing superclass "${CLS_DATA[@]}" "${CLS_COMMON[@]}" ;;
  cls-moe-superclass-loss)  # ablation: super-class loss on the router, but the ROUTER routes in training too
    run cls-moe-superclass-loss$SUF examples/run_image_classification.py "${MOBILE[@]}" \
      --superclasses_file "$EVD/runs/superclasses.json" --train_routing router "${CLS_DATA[@]}" "${CLS_COMMON[@]}" ;;
  cls-moe-router)
    run cls-moe-router$SUF examples/run_image_classification.py "${MOBILE[@]}" "${CLS_DATA[@]}" "${CLS_COMMON[@]}" ;;
  cls-token-shared)
    run cls-token-shared$SUF examples/run_image_classification.py "${TOKEN[@]}" "${CLS_DATA[@]}" "${CLS_COMMON[@]}" ;;
  seg-dense)
    run seg-dense$SUF examples/run_semantic_segmentation.py "${SEG_COMMON[@]}" --moe_layers none ;;
  seg-token)  # token MoE, E=4 full-width (384) experts, k=1, no shared expert: active FLOPs = dense + router
    run seg-token$SUF examples/run_semantic_segmentation.py "${SEG_COMMON[@]}" --routing_level token \
      --num_experts 4 --num_experts_per_tok 1 --moe_layers last:2 ;;
  seg-token-shared)  # E=4 half-width experts + a half-width shared expert, k=1: same active FLOPs
    run seg-token-shared$SUF examples/run_semantic_segmentation.py "${SEG_COMMON[@]}" \
      --config_overrides "hidden_size=96,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384,patch_size=8,moe_intermediate_size=192,shared_expert_intermediate_size=192" \
      --routing_level token --num_experts 4 --num_experts_per_tok 1 --num_shared_experts 1 --moe_layers last:2 ;;
  lane_cls)
    for r in cls-dense cls-superclasses cls-moe-superclass cls-moe-superclass-loss cls-moe-router cls-token-shared; do
      bash "$0" $r; done ;;
  lane_seg)
    for r in seg-dense seg-token-shared seg-token; do bash "$0" $r; done ;;
  *) echo "unknown run ${1:-}" >&2; exit 2 ;;
esac
