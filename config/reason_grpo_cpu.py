# GRPO and its relatives on the arithmetic task, from the base of config/reason_base_cpu.py (rlhf/reason_cpu.sh sets
# --advantage, --loss_agg and --beta per method):
#   python -m rlhf.grpo config/reason_grpo_cpu.py --policy=out/reason/base/ckpt.pt --out_dir=out/reason/grpo
task = "arithmetic"
reward = "gold"  # the verifier: the mean of correct and format (R1-Zero's accuracy and format rewards)
prompts_per_iter = 16
group_size = 8
max_iters = 60
mini_batch_size = 64
ppo_epochs = 1
learning_rate = 1e-4  # 5e-4 collapses correctness, 2e-4 erodes it (docs/reasoning.md)
min_lr = 1e-4
warmup_iters = 2
kl_mode = "loss"  # R1-Zero: the k3 KL as a constraint in the loss, not in the reward
beta = 0.04
save_interval = 20
