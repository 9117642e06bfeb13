#!/usr/bin/env bash
# The CUDA paths, checked on a GPU machine in about 5 minutes on one GPU:
#   1. the tests marked cuda (tests/test_cuda.py): bf16 autocast training and sampling, SDPA against the CPU,
#      torch.compile on CUDA (training and the decode step), the golden story on the GPU, NCCL DDP with 2 GPUs
#   2. 200 pre-training iterations of the seed's 260K command (README, "The seed's 260K-parameter model"): tokens/s
#      and MFU from its log
#   3. 3 iterations of the seed's PPO command (README, the seed's PPO experiment), from the bundled stories260K
#
#   bash bench/cuda_check.sh [OUT_DIR]    # default out/cuda_check; the output is the log to keep
#
# Data: $DATA_CACHE_DIR/tok512 when it holds pretokenized TinyStories, else a generated TinyStories-like corpus in
# OUT_DIR (the tests' generator), pretokenized with the bundled tokenizer: the speed is the same, the loss is not
# TinyStories'.
set -euo pipefail
OUT=${1:-out/cuda_check}
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: run this on a GPU machine')"
mkdir -p "$OUT"
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"

echo "=== 1. the CUDA tests"
python -m pytest -m cuda tests/test_cuda.py -q -rs

echo "=== 2. the seed's 260K pre-training command, 200 iterations"
export DATA_CACHE_DIR=${DATA_CACHE_DIR:-data}
TOK=()  # the tokenizer of the data: the one in DATA_CACHE_DIR for TinyStories, the bundled one for the generated
if ! ls "$DATA_CACHE_DIR"/tok512/*.bin > /dev/null 2>&1; then
  export DATA_CACHE_DIR="$OUT/data"
  python - "$OUT/stories.tar.gz" <<'EOF'
import sys
sys.path.insert(0, "tests")
from conftest import synthetic_archive
synthetic_archive(sys.argv[1], n_shards=3, stories_per_shard=3000)
EOF
  python tinystories.py download --data_url="$OUT/stories.tar.gz"
  python tinystories.py pretokenize --vocab_size=512 --tokenizer=stories260K/tok512.model
  TOK=(--tokenizer=stories260K/tok512.model)
fi
python train.py --out_dir="$OUT/outmini" --batch_size=128 --max_seq_len=512 --gradient_accumulation_steps=1 \
  --vocab_source="custom" --vocab_size=512 --dim=64 --n_layers=5 --n_heads=8 --n_kv_heads=4 \
  --multiple_of=4 --learning_rate=1e-3 --dropout=0.05 --weight_decay=0.01 --max_iters=200 \
  --beta2=0.99 --warmup_iters=1000 --eval_interval=200 --eval_iters=10 --compile=True --device=cuda \
  --log_interval=10 "${TOK[@]}" | tee "$OUT/pretrain.log"
echo "--- the last logged iterations (tokens/s, MFU):"
grep "tok/s" "$OUT/pretrain.log" | tail -n 3

echo "=== 3. the seed's PPO command, 3 iterations"
mkdir -p "$OUT/ppo"
cp stories260K/stories260K.pt "$OUT/ppo/ckpt.pt"
cp stories260K/tok512.model "$OUT/ppo/tok512.model"
python train.py --out_dir="$OUT/ppo" --batch_size=50 --max_seq_len=512 --gradient_accumulation_steps=1 \
  --vocab_source="custom" --vocab_size=512 --dim=64 --n_layers=5 --n_heads=8 --n_kv_heads=4 --multiple_of=4 \
  --learning_rate=1e-4 --dropout=0.00 --weight_decay=0.01 --max_iters=98002 --beta2=0.99 --warmup_iters=1000 \
  --eval_interval=20 --eval_iters=5 --compile=True --device=cuda --eval_only=False --init_from="resume" \
  --ppo=True --decay_lr=False --always_save_checkpoint=True --start_len=30 | tee "$OUT/ppo.log"
echo "--- the PPO iterations (seconds each, rollout tokens/s):"
grep "| reward" "$OUT/ppo.log"
echo "cuda_check: done in $(( $(date +%s) - T0 )) s"
