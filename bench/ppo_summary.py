"""
Summarise PPO runs of the length experiment against the targets of config/ppo_length_cpu.py: when the mean
length first entered target +- 10 (and after how many rollouts), how many consecutive iterations it then stayed,
the longest stretch in the band, whether any iteration after that stretch began left target +- 20, and the
final length, reward, KL to the reference, entropy, reference NLL and repeated-3-gram rate. One markdown row per
metrics file (train.py --ppo=True writes out_dir/metrics.jsonl).

    python bench/ppo_summary.py stories260K/metrics.jsonl [more metrics.jsonl ...] [--target=200]
    python bench/ppo_summary.py "recipe=stories260K/metrics.jsonl" "beta 0=/tmp/beta0/metrics.jsonl"  # labels
"""
import argparse
import json


def summarise(path, target=200, band=10, outer=20, rollouts_per_iteration=None):
    try:
        with open(path) as f:
            rows = [r for r in map(json.loads, f) if "reward_mean" in r]
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror}")
    if not rows:
        raise SystemExit(f"error: {path} has no PPO iterations (is it the metrics.jsonl of train.py --ppo=True?)")
    lengths = [r["length_mean"] for r in rows]
    inside = [abs(n - target) <= band for n in lengths]
    reached = inside.index(True) if any(inside) else None
    held = 0  # consecutive iterations in the band from the first one
    while reached is not None and reached + held < len(rows) and inside[reached + held]:
        held += 1
    longest, start, run = 0, None, 0  # the longest stretch of consecutive iterations in the band
    for i, ok in enumerate(inside):
        run = run + 1 if ok else 0
        if run > longest:
            longest, start = run, i - run + 1
    rollouts = None  # generated up to and including the iteration that reached the band
    if reached is not None:
        rollouts = sum(r.get("rollouts", rollouts_per_iteration) or 0 for r in rows[:reached + 1])
    left = [i for i in range(start, len(rows)) if abs(lengths[i] - target) > outer] if start is not None else []
    last = rows[-1]
    return {"iterations": len(rows), "reached": reached, "rollouts": rollouts, "held": held, "longest": longest,
            "longest_from": start, "left_outer": left, "length": last["length_mean"], "reward": last["reward_mean"],
            "kl_ref": last["kl_ref"], "entropy": last["entropy"], "ref_nll": last.get("rollout/ref_nll", float("nan")),
            "rep3": last.get("rep3_rate", float("nan")), "seconds": sum(r["time_s"] for r in rows)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("paths", nargs="+", help="metrics.jsonl files, optionally as label=path")
    parser.add_argument("--target", type=int, default=200)
    parser.add_argument("--rollouts", type=int, default=None, help="rollouts per iteration, for logs without them")
    args = parser.parse_args()
    t = args.target
    print(f"| run | iterations | first in {t} ± 10 (iteration, rollouts) | then consecutive in the band | longest "
          f"stretch (from) | outside {t} ± 20 after it began | final length | reward | kl_ref | entropy | ref NLL | "
          f"rep3 | loop seconds |")
    print("|---" * 13 + "|")
    for arg in args.paths:
        label, path = arg.split("=", 1) if "=" in arg else (arg, arg)
        s = summarise(path, t, rollouts_per_iteration=args.rollouts)
        first = "never" if s["reached"] is None else f"{s['reached']} ({s['rollouts']})"
        longest = f"{s['longest']} ({s['longest_from']})" if s["longest"] else "0"
        print(f"| {label} | {s['iterations']} | {first} | {s['held']} | {longest} | {len(s['left_outer'])} | "
              f"{s['length']:.1f} | {s['reward']:.3f} | {s['kl_ref']:.2f} | {s['entropy']:.3f} | {s['ref_nll']:.3f} | "
              f"{s['rep3']:.3f} | {s['seconds']:.0f} |")
