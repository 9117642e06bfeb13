"""
Summarise PPO runs of the length experiment against the targets of config/ppo_length_cpu.py: when the mean
length first entered target +- 10 (and after how many rollouts), how many consecutive iterations it then stayed,
the longest stretch in the band, whether any iteration after that stretch began left target +- 20, and the
final length, reward, KL to the reference, entropy, reference NLL and repeated-3-gram rate. One markdown row per
metrics file (train.py --ppo=True writes out_dir/metrics.jsonl).

    python bench/ppo_summary.py stories260K/metrics.jsonl [more metrics.jsonl ...] [--target=200]
    python bench/ppo_summary.py "recipe=stories260K/metrics.jsonl" "beta 0=/tmp/beta0/metrics.jsonl"  # label=path

Several runs of one recipe (e.g. seeds 1-5) against the recipe's targets, one row per run and a verdict:

    python bench/ppo_summary.py --targets "seed 1=out/s1/metrics.jsonl" "seed 2=out/s2/metrics.jsonl" ...

The targets (docs/ppo-length.md): the band (target +- 10) reached within 1,000 rollouts; from there >= 40 consecutive
iterations in it and none outside target +- 20; at the end kl_ref <= 10 and entropy >= 1.0; the learning rate never
below 20% of its peak once the band is reached; the loop (the iterations' time_s) within 15 minutes.
"""
import argparse
import json
import os
import sys


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
    left_after_reached = [i for i in range(reached, len(rows)) if abs(lengths[i] - target) > outer] \
        if reached is not None else []
    lrs = [r.get("lr", float("nan")) for r in rows]
    lr_floor = min(lrs[reached:]) / max(lrs) if reached is not None else float("nan")
    last = rows[-1]
    return {"iterations": len(rows), "reached": reached, "rollouts": rollouts, "held": held, "longest": longest,
            "longest_from": start, "left_outer": left, "left_after_reached": left_after_reached,
            "lr_floor": lr_floor, "length": last["length_mean"], "reward": last["reward_mean"],
            "kl_ref": last["kl_ref"], "entropy": last["entropy"], "ref_nll": last.get("rollout/ref_nll", float("nan")),
            "rep3": last.get("rep3_rate", float("nan")), "seconds": sum(r["time_s"] for r in rows)}


def check_targets(s, max_rollouts=1000, min_held=40, max_kl=10.0, min_entropy=1.0, min_lr_ratio=0.2,
                  max_seconds=900):
    """{target: passed} for one summarise() result."""
    return {"reached": s["reached"] is not None and s["rollouts"] <= max_rollouts,
            "held": s["longest"] >= min_held, "outer": s["reached"] is not None and not s["left_after_reached"],
            "kl": s["kl_ref"] <= max_kl, "entropy": s["entropy"] >= min_entropy,
            "lr": s["lr_floor"] >= min_lr_ratio, "time": s["seconds"] <= max_seconds}


def print_targets(paths, t, rollouts=None):
    print(f"| run | first in {t} ± 10 (rollouts) ≤ 1,000 | longest stretch in the band ≥ 40 (from) | outside "
          f"{t} ± 20 after reaching: none | final length | kl_ref ≤ 10 | entropy ≥ 1.0 | lowest lr after reaching "
          f"/ peak ≥ 0.2 | loop s ≤ 900 | all |")
    print("|---" * 10 + "|")
    every = True
    for arg in paths:
        label, path = arg.rsplit("=", 1) if "=" in arg else (arg, arg)
        s = summarise(path, t, rollouts_per_iteration=rollouts)
        ok = check_targets(s)
        every &= all(ok.values())

        def mark(key):
            return "" if ok[key] else " ✗"
        first = "never" if s["reached"] is None else f"{s['reached']} ({s['rollouts']})"
        left = ", ".join(str(i) for i in s["left_after_reached"]) or "none"
        print(f"| {label} | {first}{mark('reached')} | {s['longest']} ({s['longest_from']}){mark('held')} | "
              f"{left}{mark('outer')} | {s['length']:.1f} | {s['kl_ref']:.2f}{mark('kl')} | "
              f"{s['entropy']:.3f}{mark('entropy')} | {s['lr_floor']:.2f}{mark('lr')} | "
              f"{s['seconds']:.0f}{mark('time')} | {'yes' if all(ok.values()) else 'no'} |")
    print(f"\nevery target met by every run: {'yes' if every else 'no'}")
    return every


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("paths", nargs="+", help="metrics.jsonl files, optionally as label=path")
    parser.add_argument("--target", type=int, default=200)
    parser.add_argument("--rollouts", type=int, default=None, help="rollouts per iteration, for logs without them")
    parser.add_argument("--targets", action="store_true", help="check every run against the recipe's targets")
    parser.add_argument("--plot", default="", help="with --targets: a PNG of every run's curves (needs matplotlib)")
    args = parser.parse_args()
    t = args.target
    if args.targets:
        every = print_targets(args.paths, t, args.rollouts)
        if args.plot:
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from report import plot_ppo_runs
            runs = dict(a.rsplit("=", 1) if "=" in a else (a, a) for a in args.paths)
            print(f"plotted to {args.plot}" if plot_ppo_runs(runs, args.plot, t) else "no plot: matplotlib is missing")
        raise SystemExit(0 if every else 1)
    print(f"| run | iterations | first in {t} ± 10 (iteration, rollouts) | then consecutive in the band | longest "
          f"stretch (from) | outside {t} ± 20 after it began | final length | reward | kl_ref | entropy | ref NLL | "
          f"rep3 | loop seconds |")
    print("|---" * 13 + "|")
    for arg in args.paths:
        label, path = arg.rsplit("=", 1) if "=" in arg else (arg, arg)
        s = summarise(path, t, rollouts_per_iteration=args.rollouts)
        first = "never" if s["reached"] is None else f"{s['reached']} ({s['rollouts']})"
        longest = f"{s['longest']} ({s['longest_from']})" if s["longest"] else "0"
        print(f"| {label} | {s['iterations']} | {first} | {s['held']} | {longest} | {len(s['left_outer'])} | "
              f"{s['length']:.1f} | {s['reward']:.3f} | {s['kl_ref']:.2f} | {s['entropy']:.3f} | {s['ref_nll']:.3f} | "
              f"{s['rep3']:.3f} | {s['seconds']:.0f} |")
