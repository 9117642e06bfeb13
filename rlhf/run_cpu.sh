#!/usr/bin/env bash
# The whole RLHF chain on a CPU, from the bundled stories260K and local TinyStories shards, on the story task
# (tasks/story.py; TASK=instruct for the instruction task, tasks/instruct.py):
#   pilot -> SFT -> reward model -> DPO, PPO on the reward model, GRPO (reward model, gold), a longer GRPO run on
#   the reward model with checkpoints and its beta = 0 ablation -> best-of-n -> every method evaluated on the
#   same held-out prompts -> OUT_DIR/report.md, report.json, overoptimisation.png, samples_<method>.jsonl
#
#   bash rlhf/run_cpu.sh out/rlhf                        # data from $DATA_CACHE_DIR (default data/), downloaded
#   DATA_URL=PATH_OR_URL bash rlhf/run_cpu.sh out/rlhf   # a local copy (or another URL) of the TinyStories archive
#   SEED=2 bash rlhf/run_cpu.sh out/rlhf_seed2          # another draw of the whole chain (every stage's --seed)
#
# Resumable: a stage whose output exists is skipped (delete the output to redo it); a stage that was killed continues
# from where it last saved (its out_dir/state.pt). Every stage is a script you
# can run alone as `python -m rlhf.<stage>` (docs/rlhf-chain.md); this file is the recipe, 20-25 minutes on 2 CPU cores.
set -euo pipefail
OUT=${1:?usage: bash rlhf/run_cpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
export DATA_CACHE_DIR=${DATA_CACHE_DIR:-data}
TASK=${TASK:-story}
mkdir -p "$OUT"
TIMES="$OUT/timings.tsv"  # NAME<TAB>seconds of each stage run (appended; a resumed chain keeps the earlier ones)
T0=$(date +%s)
stage() {  # stage NAME OUTPUT command...: run the command unless OUTPUT exists, log its wall time
  if [ -e "$2" ]; then echo "=== $1: $2 exists, skipped"; return; fi
  local t=$(date +%s)
  echo "=== $1 ($(( t - T0 )) s into this run)"
  "${@:3}"
  echo -e "$1\t$(( $(date +%s) - t ))" >> "$TIMES"
}
SFT="$OUT/sft/ckpt.pt"
RM="$OUT/rm/rm.pt"
COMMON=(--task="$TASK" ${SEED:+--seed="$SEED"})  # SEED=n: every stage's --seed (the default: each stage's own)
EVAL=(python -m rlhf.evaluate "${COMMON[@]}" --out_dir="$OUT" --sft="$SFT" --reward_model="$RM" --n_prompts=128)
evaluate() {  # evaluate NAME CHECKPOINT, or NAME FOLDER: a run's ckpt_<iter>.pt (NAME@ITER), then its ckpt.pt
  stage "eval_$1" "$OUT/eval_$1.json" "${EVAL[@]}" --policy="$2" --name="$1"
}

# 0. data, and the pilot: each gold component on real continuations and on the pre-trained model's samples
stage download "$DATA_CACHE_DIR/TinyStories_all_data" python tinystories.py download ${DATA_URL:+--data_url="$DATA_URL"}
if [ "$TASK" = story ]; then
  stage pilot "$OUT/pilot.json" python -m rlhf.pilot --n=200 --out="$OUT/pilot.json"
else
  stage check "$OUT/check.json" python -m rlhf.pilot --task=instruct --out="$OUT/check.json"
fi

# 1. SFT, 2. the reward model (its pools are DPO's pairs), 3. DPO
stage sft "$SFT" python -m rlhf.sft "${COMMON[@]}" --out_dir="$OUT/sft"
stage reward_model "$RM" python -m rlhf.reward_model "${COMMON[@]}" --policy="$SFT" --out_dir="$OUT/rm"
stage dpo "$OUT/dpo/ckpt.pt" python -m rlhf.dpo "${COMMON[@]}" --policy="$SFT" --pairs="$OUT/rm/pool_train.jsonl" \
  --out_dir="$OUT/dpo"

# 4. PPO and GRPO on the learned reward, GRPO on gold itself (no proxy)
stage ppo_rm "$OUT/ppo_rm/ckpt.pt" python -m rlhf.ppo_rlhf "${COMMON[@]}" --policy="$SFT" --reward="$RM" \
  --out_dir="$OUT/ppo_rm"
stage grpo_rm "$OUT/grpo_rm/ckpt.pt" python -m rlhf.grpo "${COMMON[@]}" --policy="$SFT" --reward="$RM" \
  --out_dir="$OUT/grpo_rm"
stage grpo_gold "$OUT/grpo_gold/ckpt.pt" python -m rlhf.grpo "${COMMON[@]}" --policy="$SFT" --reward=gold \
  --out_dir="$OUT/grpo_gold"

# 5. over-optimisation: a longer run on the reward model with checkpoints, and without the KL penalty
stage grpo_rm_long "$OUT/grpo_rm_long/ckpt.pt" python -m rlhf.grpo "${COMMON[@]}" --policy="$SFT" --reward="$RM" \
  --out_dir="$OUT/grpo_rm_long" --max_iters=60 --save_interval=10 --learning_rate=3e-4 --min_lr=3e-4
stage grpo_rm_beta0 "$OUT/grpo_rm_beta0/ckpt.pt" python -m rlhf.grpo "${COMMON[@]}" --policy="$SFT" --reward="$RM" \
  --out_dir="$OUT/grpo_rm_beta0" --max_iters=40 --save_interval=5 --learning_rate=3e-4 --min_lr=3e-4 --beta=0

# 6. best-of-n from one pool of SFT samples
stage best_of_n "$OUT/bon.json" python -m rlhf.best_of_n "${COMMON[@]}" --policy="$SFT" --reward="$RM" --out_dir="$OUT"

# 7. every method on the same held-out prompts, then the report
evaluate pretrained stories260K/stories260K.pt
evaluate sft "$SFT"
evaluate dpo "$OUT/dpo/ckpt.pt"
evaluate ppo_rm "$OUT/ppo_rm/ckpt.pt"
evaluate grpo_rm "$OUT/grpo_rm/ckpt.pt"
evaluate grpo_gold "$OUT/grpo_gold/ckpt.pt"
evaluate grpo_rm_long "$OUT/grpo_rm_long"
evaluate grpo_rm_beta0 "$OUT/grpo_rm_beta0"
python -m rlhf.evaluate --report="$OUT"
echo "this run took $(( $(date +%s) - T0 )) s; the stages' times are in $TIMES; report: $OUT/report.md"
