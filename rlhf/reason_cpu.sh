#!/usr/bin/env bash
# Reasoning from scratch on a CPU: DeepSeek-R1-Zero's recipe (RL with verifiable rewards, no SFT) on integer
# arithmetic (tasks/arithmetic.py), from a base model trained here from nothing:
#   a generated corpus -> tokenizer (digits split) -> pretokenize -> train.py -> the base, evaluated
#   -> GRPO, Dr. GRPO, RLOO and PPO, each with the k3 KL to the base in the loss and without it
#   -> every method on the same held-out problems (pass@k, greedy, format, lengths, KL, out of distribution)
#   -> OUT_DIR/report.md, report.json, reason_curves.png, reason_pass_at_k.png, samples_<method>.jsonl
#
#   bash rlhf/reason_cpu.sh out/reason          # ~19 minutes on 2 CPU cores
#   SEED=2 bash rlhf/reason_cpu.sh out/reason2  # another draw of the RL runs and evaluations
#   QUICK=1 bash rlhf/reason_cpu.sh out/tiny    # a seconds-long miniature of the whole command (the tests run it)
#
# The RL runs and evaluations go in two lanes side by side (without the KL, with it), each on half the cores: at
# this model's size one process keeps two cores only ~2/3 busy (two single-thread processes do 1.5x the work of one
# on two threads). Each stage's output goes to OUT_DIR/logs/STAGE.log.
# Resumable: a stage whose output exists is skipped (delete the output to redo it); a killed RL run continues from
# where it last saved (its out_dir/state.pt). docs/reasoning.md has the study.
set -euo pipefail
OUT=${1:?usage: bash rlhf/reason_cpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
export DATA_CACHE_DIR="$OUT/data"  # the corpus, its tokenizer and its shards live with the run
mkdir -p "$OUT/logs"
TIMES="$OUT/timings.tsv"  # NAME<TAB>seconds of each stage, and "wall" for each invocation (appended on resume)
T0=$(date +%s)
wall() { echo -e "wall\t$(( $(date +%s) - T0 ))" >> "$TIMES"; }
trap wall EXIT  # this invocation's wall time, even when a stage fails
trap 'trap "" TERM; kill 0; exit 130' INT TERM  # Ctrl-C stops both lanes too
LIVE=1  # show a stage's output as it runs (the lanes below only log it)
stage() {  # stage NAME OUTPUT command...: run the command unless OUTPUT exists, log its wall time
  if [ -e "$2" ]; then echo "=== $1: $2 exists, skipped"; return; fi
  local t=$(date +%s) log="$OUT/logs/$1.log"
  echo "=== $1 ($(( t - T0 )) s into this run; log: $log)"
  if [ -n "$LIVE" ]; then "${@:3}" 2>&1 | tee "$log"; elif ! "${@:3}" > "$log" 2>&1; then
    echo "=== $1 failed; the end of $log:"; tail -n 5 "$log"; return 1; fi
  echo "=== $1 done in $(( $(date +%s) - t )) s: $(grep -v '^\s*$' "$log" | tail -n 1 | tr '\r' '\n' | tail -n 1)"
  echo -e "$1\t$(( $(date +%s) - t ))" >> "$TIMES"
}
SEED=${SEED:-1337}
if [ -n "${QUICK:-}" ]; then  # the miniature: a few hundred documents, a few iterations, a few samples
  DOCS=2000; BASE=(--max_iters=30 --eval_interval=15 --eval_iters=2 --warmup_iters=5 --dim=32 --n_layers=1)
  RL=(--max_iters=2 --save_interval=1 --prompts_per_iter=4 --group_size=2 --mini_batch_size=8)
  PPO=(--max_iters=2 --save_interval=1 --rollouts=8 --mini_batch_size=8)
  EVAL=(--n_problems=8 --n_samples=4 --n_ood=4 --batch_size=16)
else
  DOCS=200000; BASE=(); RL=(); PPO=(); EVAL=()
fi
BASE_CKPT="$OUT/base/ckpt.pt"
ARGS=(--task=arithmetic --policy="$BASE_CKPT" --reward=gold --seed="$SEED")

# 1. the base: corpus, tokenizer, shards, pre-training
stage corpus "$DATA_CACHE_DIR/arithmetic/data00.json" python -m rlhf.arithmetic_corpus \
  --out_dir="$DATA_CACHE_DIR/arithmetic" --n_docs=$DOCS
stage tokenizer "$DATA_CACHE_DIR/tok320.model" python tinystories.py train_vocab --vocab_size=320 \
  --data_dir="$DATA_CACHE_DIR/arithmetic"
stage pretokenize "$DATA_CACHE_DIR/tok320/data00.bin" python tinystories.py pretokenize --vocab_size=320 \
  --data_dir="$DATA_CACHE_DIR/arithmetic"
stage base "$BASE_CKPT" python train.py config/reason_base_cpu.py --out_dir="$OUT/base" "${BASE[@]}"

# 2. RL from the base, every method with the k3 KL to the base in the loss (_kl) and without it, same budget
evaluate() {  # evaluate NAME CHECKPOINT: the held-out evaluation (report.py builds the report from them)
  stage "eval_$1" "$OUT/eval_$1.json" python -m rlhf.reason_eval --policy="$2" --name="$1" --base="$BASE_CKPT" \
    --out_dir="$OUT" --seed="$SEED" "${EVAL[@]}"
}
rl() {  # rl NAME MODULE CONFIG flags...: the run (its metrics.jsonl gives the curves), then its last checkpoint
  local name=$1 module=$2 config=$3; shift 3
  stage "$name" "$OUT/$name/ckpt.pt" python -m "$module" "$config" "${ARGS[@]}" --out_dir="$OUT/$name" "$@"
  evaluate "$name" "$OUT/$name/ckpt.pt"
}
lane() {  # lane "" | _kl: the four methods without the KL, or with the k3 KL to the base in the loss
  local kl=$1 BETA=(--beta=0) KL=(--init_kl_coef=0)
  [ -n "$kl" ] && BETA=(--beta=0.04) && KL=(--init_kl_coef=0.04)
  rl "grpo$kl" rlhf.grpo config/reason_grpo_cpu.py --advantage=grpo --loss_agg=sequence "${BETA[@]}" "${RL[@]}"
  rl "drgrpo$kl" rlhf.grpo config/reason_grpo_cpu.py --advantage=drgrpo --loss_agg=constant "${BETA[@]}" "${RL[@]}"
  rl "rloo$kl" rlhf.grpo config/reason_grpo_cpu.py --advantage=rloo --loss_agg=token "${BETA[@]}" "${RL[@]}"
  rl "ppo$kl" rlhf.ppo_rlhf config/reason_ppo_cpu.py "${KL[@]}" "${PPO[@]}"
}
LIVE=
CORES=$(python -c "import os; print(os.cpu_count() or 2)")
export OMP_NUM_THREADS=$(( CORES > 1 ? CORES / 2 : 1 ))
( evaluate base "$BASE_CKPT" ) & BASE_EVAL=$!  # beside the lanes' first runs: it evens out their ends
( lane "" ) & NO_KL=$!
( lane _kl ) & WITH_KL=$!
FAILED=0
for pid in $BASE_EVAL $NO_KL $WITH_KL; do wait $pid || FAILED=1; done
[ $FAILED = 0 ] || { echo "a stage failed (above); re-run the same command to resume"; exit 1; }

# 3. the report
trap - EXIT; wall
python -m rlhf.reason_eval --report="$OUT"
echo -e "this run took $(( $(date +%s) - T0 )) s; the stages' times are in $TIMES; report: $OUT/report.md"
