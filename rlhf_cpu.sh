#!/usr/bin/env bash
# The whole RLHF chain on a CPU, from the bundled stories260K and local TinyStories shards:
#   SFT -> reward model -> DPO -> PPO on the reward model -> GRPO (gold, reward model) -> best-of-n -> evaluation
# of every method on held-out prompts -> OUT_DIR/report.md, report.json, samples_<method>.jsonl, overoptimisation.png
#
#   bash rlhf_cpu.sh out/rlhf                                   # data from $DATA_CACHE_DIR (default data/)
#   DATA_URL=../shared/tinystories/TinyStories_all_data.tar.gz bash rlhf_cpu.sh out/rlhf   # offline archive
#
# Every stage is a script you can run alone (see README "4. The RLHF chain"); this file is the recipe.
set -euo pipefail
OUT=${1:?usage: bash rlhf_cpu.sh OUT_DIR}
cd "$(dirname "$0")"
export DATA_CACHE_DIR=${DATA_CACHE_DIR:-data}
mkdir -p "$OUT"
TIMES="$OUT/timings.tsv"
: > "$TIMES"
T0=$(date +%s)
stage() {  # stage NAME command...: run it, log its wall time
  local t=$(date +%s)
  echo "=== $1 ($(( t - T0 )) s into the chain)"
  "${@:2}"
  echo -e "$1\t$(( $(date +%s) - t ))" >> "$TIMES"
}
RM="$OUT/rm/rm.pt"
SFT="$OUT/sft/ckpt.pt"
EVAL=(python evaluate.py --out_dir="$OUT" --sft="$SFT" --reward_model="$RM")

# 0. data: the JSON shards (instruction prompts) and tok512 shards (PPO's validation loss)
if [ ! -d "$DATA_CACHE_DIR/TinyStories_all_data" ]; then
  stage download python tinystories.py download ${DATA_URL:+--data_url="$DATA_URL"}
fi
if [ ! -f "$DATA_CACHE_DIR/tok512/meta.json" ]; then
  stage pretokenize python tinystories.py pretokenize --vocab_size=512 --tokenizer=stories260K/tok512.model
fi
stage check python instruct.py check --out="$OUT/check.json"

# 1. SFT, 2. the reward model (its pools are DPO's pairs), 3. DPO
stage sft python sft.py --out_dir="$OUT/sft"
stage reward_model python reward_model.py --sft="$SFT" --out_dir="$OUT/rm"
stage dpo python dpo.py --sft="$SFT" --pairs="$OUT/rm/pool_train.jsonl" --out_dir="$OUT/dpo"

# 4. PPO on the learned reward (train.py; the SFT model is its KL reference)
mkdir -p "$OUT/ppo_rm" && cp "$SFT" "$OUT/ppo_rm/ckpt.pt"
stage ppo_rm python train.py config/ppo_rm_cpu.py --out_dir="$OUT/ppo_rm" --reward="$RM"

# 5. GRPO on gold and on the learned reward (checkpoints every 5 iterations for the over-optimisation curve)
stage grpo_gold python grpo.py --sft="$SFT" --reward=gold --out_dir="$OUT/grpo_gold"
stage grpo_rm python grpo.py --sft="$SFT" --reward="$RM" --out_dir="$OUT/grpo_rm" --save_interval=5

# 6. best-of-n from one pool of SFT samples
stage best_of_n python best_of_n.py --sft="$SFT" --reward_model="$RM" --out_dir="$OUT"

# 7. evaluation of every method on the same held-out prompts, then the report
stage eval_pretrained "${EVAL[@]}" --checkpoint=stories260K/stories260K.pt --name=pretrained
stage eval_sft "${EVAL[@]}" --checkpoint="$SFT" --name=sft
stage eval_dpo "${EVAL[@]}" --checkpoint="$OUT/dpo/ckpt.pt" --name=dpo
stage eval_ppo_rm "${EVAL[@]}" --checkpoint="$OUT/ppo_rm/ppo_ckpt.pt" --name=ppo_rm
stage eval_grpo_gold "${EVAL[@]}" --checkpoint="$OUT/grpo_gold/ckpt.pt" --name=grpo_gold
for ck in "$OUT"/grpo_rm/ckpt_*.pt; do
  [ -e "$ck" ] || continue
  i=$(basename "$ck" .pt); i=${i#ckpt_}
  stage "eval_grpo_rm@$i" "${EVAL[@]}" --checkpoint="$ck" --name="grpo_rm@$i"
done
stage eval_grpo_rm "${EVAL[@]}" --checkpoint="$OUT/grpo_rm/ckpt.pt" --name=grpo_rm
python evaluate.py --report="$OUT"
echo "the chain took $(( $(date +%s) - T0 )) s; report: $OUT/report.md"
