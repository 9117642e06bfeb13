# The base model of the reasoning study (rlhf/reason_cpu.sh): a small Llama trained from nothing on the generated
# arithmetic corpus (rlhf/arithmetic_corpus.py; tokenizer with digits split, trained by tinystories.py):
#   export DATA_CACHE_DIR=out/reason/data
#   python -m rlhf.arithmetic_corpus --out_dir=$DATA_CACHE_DIR/arithmetic
#   python tinystories.py train_vocab --vocab_size=320 --data_dir=$DATA_CACHE_DIR/arithmetic
#   python tinystories.py pretokenize --vocab_size=320 --data_dir=$DATA_CACHE_DIR/arithmetic
#   python train.py config/reason_base_cpu.py --out_dir=out/reason/base
out_dir = "out/reason/base"
vocab_source = "custom"
vocab_size = 320  # byte fallback's 256 + the corpus's ~35 characters + the merges this small corpus allows
dim = 96
n_layers = 4
n_heads = 4
n_kv_heads = 4
multiple_of = 32
max_seq_len = 128  # two documents of ~60 tokens
batch_size = 64
gradient_accumulation_steps = 1
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 100
max_iters = 600
weight_decay = 0.01
beta2 = 0.99
dropout = 0.0
eval_interval = 300
eval_iters = 20
always_save_checkpoint = True  # the last model is the base, not the one with the best validation loss
