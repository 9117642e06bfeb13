"""
How much of a PPO iteration's mean story length is sampling noise: from one policy checkpoint, without training,
draw --reps batches of --rollouts rollouts exactly as train.py's PPO iterations do (the queries of
tasks.length.story_queries, temperature 1, the end token kept), first with fresh queries per batch, then with the same
queries every time, and compare the standard deviation of the batches' mean lengths with what independent
rollouts give, the spread / sqrt(rollouts). A PPO run's means vary more than this from iteration to iteration;
the difference is the policy's movement between iterations (docs/ppo-length.md, "Holding the band on every seed").

    python bench/ppo_length_noise.py --checkpoint=stories260K/ppo_last.pt            # CPU, ~1.5 minutes
    python bench/ppo_length_noise.py --checkpoint=out/ppo_ckpt.pt --rollouts=320 --reps=20 --device=cuda

Needs the pretokenized data (python tinystories.py pretokenize --vocab_size=512 --tokenizer=...).
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from generate import generate_withcache  # noqa: E402
from ppo import story_lengths  # noqa: E402
from tasks.length import LengthSampler, story_queries  # noqa: E402
from tinystories import BatchStream, DataError  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a policy checkpoint (ppo_ckpt.pt, ppo_last.pt, ckpt.pt)")
    parser.add_argument("--rollouts", type=int, default=256, help="rollouts per batch")
    parser.add_argument("--reps", type=int, default=10, help="batches per setting")
    parser.add_argument("--start_len", type=int, default=30, help="queries: BOS + 0..start_len-1 story tokens")
    parser.add_argument("--max_gen_len", type=int, default=300)
    parser.add_argument("--bos_id", type=int, default=1, help="the end token (a story ends where the next begins)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.rollouts < 2 or args.reps < 2:
        sys.exit(f"error: --rollouts and --reps must be >= 2, got {args.rollouts} and {args.reps}")
    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model = model_from_checkpoint(checkpoint).to(args.device)
    model_args = model.params
    try:
        stream = BatchStream(split="train", seed=args.seed, batch_size=64, max_seq_len=model_args.max_seq_len,
                             vocab_size=model_args.vocab_size, vocab_source="custom", device="cpu", num_workers=0)
    except DataError as e:
        sys.exit(f"error: {e}")
    query_length = LengthSampler(0, args.start_len, seed=args.seed)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)

    def batch(queries):
        responses = generate_withcache(model, queries, args.max_gen_len, temperature=1.0, top_k=0, top_p=1.0,
                                       eos_id=args.bos_id, device=args.device, generator=generator,
                                       keep_stop_token=True)
        lengths, _ = story_lengths(queries, responses, args.bos_id)
        return statistics.mean(lengths), statistics.stdev(lengths)

    fixed = story_queries(stream.next, args.rollouts, query_length, args.bos_id)
    print(f"{args.checkpoint}: {args.reps} batches of {args.rollouts} rollouts per row")
    print("| queries | batch means | sd of the means | spread / sqrt(rollouts) |")
    print("|---|---|---|---|")
    for name in ("fresh per batch", "the same every batch"):
        stats = [batch(story_queries(stream.next, args.rollouts, query_length, args.bos_id) if name.startswith("fresh")
                       else fixed) for _ in range(args.reps)]
        means = [m for m, _ in stats]
        expected = statistics.mean(s for _, s in stats) / args.rollouts ** 0.5
        print(f"| {name} | {' '.join(f'{m:.1f}' for m in means)} | {statistics.stdev(means):.2f} | {expected:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
