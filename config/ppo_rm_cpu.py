# PPO on the instruction task (instruct.py) from an SFT model, with a learned reward or the gold judge.
# Put the SFT checkpoint at out_dir/ckpt.pt (it is also the KL reference), then
#   python train.py config/ppo_rm_cpu.py --out_dir=out/rlhf/ppo_rm --reward=out/rlhf/rm/rm.pt
# (rlhf_cpu.sh does both). Needs the data pretokenized with the policy's tokenizer for the validation loss:
#   python tinystories.py pretokenize --vocab_size=512 --tokenizer=stories260K/tok512.model
out_dir = "out/rlhf/ppo_rm"
init_from = "resume"
ppo = True
reward = "out/rlhf/rm/rm.pt"
tokenizer = "stories260K/tok512.model"  # the policy's (SFT keeps stories260K's)
device = "cpu"
vocab_source = "custom"
vocab_size = 512
dropout = 0.0
batch_size = 32  # rollouts per PPO minibatch
rollouts = 64  # rollouts per iteration, each on its own prompt
gradient_accumulation_steps = 1
ppo_epochs = 2
max_gen_len = 431  # the longest story of the task (instruct.MAX_STORY_TOKENS) and its end token
max_iters = 16
learning_rate = 1e-4
decay_lr = True
warmup_iters = 0
min_lr = 1e-5
weight_decay = 0.0
beta2 = 0.99
init_kl_coef = 0.05
adap_kl_ctrl = False
kl_mode = "loss"  # the KL in the loss: no pressure towards shorter stories (see README section 3)
lam = 1.0
eval_interval = 4
eval_iters = 1
always_save_checkpoint = True  # ppo_ckpt.pt is the last evaluated policy, for evaluate.py
log_interval = 1
