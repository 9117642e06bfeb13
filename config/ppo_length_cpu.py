# The seed's length experiment (reward -|200 - story length| / 100) on a laptop CPU in under 10 minutes, holding
# the target. From the bundled stories260K:
#   cp stories260K/stories260K.pt stories260K/ckpt.pt
#   python tinystories.py download && python tinystories.py pretokenize --vocab_size=512 --tokenizer=stories260K/tok512.model
#   python train.py config/ppo_length_cpu.py
# What differs from the seed's command, and why (README, section 3, has the ablation):
#   kl_mode = "loss": the KL to the reference acts in the loss, token by token, instead of in the reward. In the
#     reward, every token of a story costs beta * (log pi - log pi_ref), so ending early pays; once
#     beta * KL per token exceeds the score's 0.01 per token the length falls through the target and keeps falling.
#   128 rollouts per iteration, one epoch of two minibatches, lambda = 1: the seed's 400 x 4 epochs take ~60 s per
#     iteration here; the score reaches every token of the story, not only the last ~20.
#   learning rate 1.5e-4, cosine-decayed to 5e-6 over the first 10 iterations: fast to the target, then the policy
#     settles instead of oscillating around it or creeping away (the reference's ~300-token stories pull on it).
#   KL coefficient 0.1, adaptive towards 10 nats per story and able to move 5% per iteration (TRL's horizon of
#     10,000 rollouts moves it 0.26% at this batch size).
out_dir = "stories260K"
init_from = "resume"
ppo = True
device = "cpu"
vocab_source = "custom"
vocab_size = 512
max_seq_len = 512
dropout = 0.0
weight_decay = 0.01
beta2 = 0.99
gradient_accumulation_steps = 1
# the seed's experiment
start_len = 30
max_gen_len = 300
target_len = 200
# the recipe
batch_size = 64  # minibatch
rollouts = 128
ppo_epochs = 1
lam = 1.0
learning_rate = 1.5e-4
decay_lr = True
warmup_iters = 0
lr_decay_iters = 98010  # cosine to min_lr over the first 10 iterations, then min_lr
min_lr = 5e-6
max_iters = 98031  # stories260K.pt is at iteration 98000: 32 PPO iterations
init_kl_coef = 0.1
adap_kl_ctrl = True
adap_kl_target = 10.0
kl_horizon = 512
kl_mode = "loss"
eval_interval = 5  # keep the best-reward policy (ppo_ckpt.pt) every 5 iterations
eval_iters = 1
