# PPO (ppo.PPOTrainer, with its critic) on the arithmetic task, from the base of config/reason_base_cpu.py
# (rlhf/reason_cpu.sh sets --init_kl_coef per run: 0.04, or 0 for no KL):
#   python -m rlhf.ppo_rlhf config/reason_ppo_cpu.py --policy=out/reason/base/ckpt.pt --out_dir=out/reason/ppo
task = "arithmetic"
reward = "gold"
rollouts = 128
mini_batch_size = 64
ppo_epochs = 1
max_iters = 60
learning_rate = 1e-4  # 5e-4 collapses correctness, 2e-4 erodes it (docs/reasoning.md)
min_lr = 1e-4
init_kl_coef = 0.04
kl_penalty = "k3"
kl_mode = "loss"  # the k3 KL in the loss, as for GRPO
lam = 1.0  # 0.95 decays the reward given at the end: PPO then learns to stop early (docs/reasoning.md)
vf_coef = 0.1
save_interval = 20
