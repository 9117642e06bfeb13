#!/usr/bin/env bash
# The whole RLHF chain on a CPU, from the bundled stories260K and local TinyStories shards:
#   SFT -> reward model -> DPO -> PPO on the reward model -> GRPO (gold, reward model, reward model with beta = 0)
#   -> best-of-n -> evaluation of every method on held-out prompts
#   -> OUT_DIR/report.md, report.json, samples_<method>.jsonl, overoptimisation.png
#
#   bash rlhf_cpu.sh out/rlhf                                   # data from $DATA_CACHE_DIR (default data/)
#   DATA_URL=../shared/tinystories/TinyStories_all_data.tar.gz bash rlhf_cpu.sh out/rlhf   # offline archive
#
# Resumable: a stage whose output exists is skipped (delete the output to redo it). Every stage is a script you
# can run alone (README "4. The RLHF chain"); this file is the recipe, sized for ~30 minutes on 2 CPU cores.
set -euo pipefail
OUT=${1:?usage: bash rlhf_cpu.sh OUT_DIR}
cd "$(dirname "$0")"
export DATA_CACHE_DIR=${DATA_CACHE_DIR:-data}
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
RM="$OUT/rm/rm.pt"
SFT="$OUT/sft/ckpt.pt"
EVAL=(python evaluate.py --out_dir="$OUT" --sft="$SFT" --reward_model="$RM" --n_prompts=128)
evaluate() {  # evaluate NAME CHECKPOINT
  stage "eval_$1" "$OUT/eval_$1.json" "${EVAL[@]}" --checkpoint="$2" --name="$1"
}

# 0. data: the JSON shards (instruction prompts) and tok512 shards (PPO's validation loss)
stage download "$DATA_CACHE_DIR/TinyStories_all_data" python tinystories.py download ${DATA_URL:+--data_url="$DATA_URL"}
stage pretokenize "$DATA_CACHE_DIR/tok512/meta.json" \
  python tinystories.py pretokenize --vocab_size=512 --tokenizer=stories260K/tok512.model
stage check "$OUT/check.json" python instruct.py check --out="$OUT/check.json"

# 1. SFT, 2. the reward model (its pools are DPO's pairs), 3. DPO
stage sft "$SFT" python sft.py --out_dir="$OUT/sft" --max_iters=100
stage reward_model "$RM" python reward_model.py --sft="$SFT" --out_dir="$OUT/rm" --n_train_prompts=192 \
  --n_heldout_prompts=96
stage dpo "$OUT/dpo/ckpt.pt" python dpo.py --sft="$SFT" --pairs="$OUT/rm/pool_train.jsonl" --out_dir="$OUT/dpo" \
  --epochs=1

# 4. PPO on the learned reward (train.py; the SFT model is its KL reference)
mkdir -p "$OUT/ppo_rm" && cp -n "$SFT" "$OUT/ppo_rm/ckpt.pt"
stage ppo_rm "$OUT/ppo_rm/ppo_ckpt.pt" python train.py config/ppo_rm_cpu.py --out_dir="$OUT/ppo_rm" --reward="$RM" \
  --max_iters=8

# 5. GRPO on gold and on the learned reward (checkpoints every 5 iterations for the over-optimisation curve),
#    and on the learned reward without the KL penalty (beta = 0: the proxy alone)
stage grpo_gold "$OUT/grpo_gold/ckpt.pt" python grpo.py --sft="$SFT" --reward=gold --out_dir="$OUT/grpo_gold" \
  --max_iters=10
stage grpo_rm "$OUT/grpo_rm/ckpt.pt" python grpo.py --sft="$SFT" --reward="$RM" --out_dir="$OUT/grpo_rm" \
  --max_iters=10 --save_interval=5
stage grpo_rm_beta0 "$OUT/grpo_rm_beta0/ckpt.pt" python grpo.py --sft="$SFT" --reward="$RM" \
  --out_dir="$OUT/grpo_rm_beta0" --max_iters=10 --beta=0

# 6. best-of-n from one pool of SFT samples
stage best_of_n "$OUT/bon.json" python best_of_n.py --sft="$SFT" --reward_model="$RM" --out_dir="$OUT" \
  --n_prompts=64 --pool_size=16

# 7. evaluation of every method on the same held-out prompts, then the report
evaluate pretrained stories260K/stories260K.pt
evaluate sft "$SFT"
evaluate dpo "$OUT/dpo/ckpt.pt"
evaluate ppo_rm "$OUT/ppo_rm/ppo_ckpt.pt"
evaluate grpo_gold "$OUT/grpo_gold/ckpt.pt"
for ck in "$OUT"/grpo_rm/ckpt_*.pt; do
  [ -e "$ck" ] || continue
  i=$(basename "$ck" .pt); evaluate "grpo_rm@${i#ckpt_}" "$ck"
done
evaluate grpo_rm "$OUT/grpo_rm/ckpt.pt"
evaluate grpo_rm_beta0 "$OUT/grpo_rm_beta0/ckpt.pt"
python evaluate.py --report="$OUT"
echo "this run took $(( $(date +%s) - T0 )) s; the stages' times are in $TIMES; report: $OUT/report.md"
