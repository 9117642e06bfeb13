"""
Score any checkpoint on the held-out instruction prompts (shard 0, never trained on): one story per prompt
at temperature 1, judged by gold (instruct.py) with a bootstrap 95% CI, per-constraint satisfaction, the reward
model's score, and the guard: KL to the SFT model (nats/story), reference NLL (nats/token under the frozen
pre-trained model) and the repeated-3-gram rate.

    python evaluate.py --checkpoint=out/rlhf/dpo/ckpt.pt --name=dpo --out_dir=out/rlhf
    python evaluate.py --checkpoint=stories260K/stories260K.pt --name=pretrained   # the same prompts, no SFT
    python evaluate.py --report=out/rlhf      # report.json, report.md and the plots from every eval_*.json

Writes out_dir/eval_<name>.json and out_dir/samples_<name>.jsonl ({"prompt", "constraints", "story", ...} per
line). CPU: ~1 minute for 200 prompts; one GPU: the same command.
"""
import glob
import json
import math
import os
import sys
import time


import configurator
from generate import compile_decode
from instruct import KINDS, InstructData, bootstrap_ci
from rlhf import (guard_metrics, load_policy, reward_scores, sample_record, sample_stories,
                  write_jsonl)
from utils import atomic_write, fail, load_checkpoint, load_tokenizer, pick_device

# -----------------------------------------------------------------------------
checkpoint = "out/rlhf/sft/ckpt.pt"
name = ""  # the method's name in the file names and the report (default: the checkpoint's folder)
out_dir = "out/rlhf"
sft = "out/rlhf/sft/ckpt.pt"  # KL to SFT is measured against it ("" to skip)
reference = "stories260K/stories260K.pt"  # the frozen pre-trained model of the guard's NLL
reward_model = ""  # a reward model (rm.pt) to report its score ("" to skip)
kinds = ""  # the constraints of the prompts (default: the SFT checkpoint's)
tokenizer = "stories260K/tok512.model"
data_dir = ""
n_prompts = 200
temperature = 1.0
batch_size = 64
device = "auto"
compile = "auto"  # compile the decode step
seed = 0
report = ""  # a folder: build report.json / report.md / plots from its eval_*.json, rm.json and bon.json, and exit
# -----------------------------------------------------------------------------
configurator.apply_or_exit(globals(), sys.argv[1:])


def summarise(records):
    """Means (and gold's bootstrap CI) of the per-story records."""
    n = len(records)
    mean, lo, hi = bootstrap_ci([r["gold"] for r in records])
    out = {"n": n, "gold": mean, "gold_ci": [lo, hi], "per_constraint": {}}
    for kind in KINDS:
        vals = [r["scores"][kind] for r in records if kind in r["scores"]]
        if vals:
            out["per_constraint"][kind] = {"n": len(vals), "mean": sum(vals) / len(vals)}
    for key in ("kl_sft", "ref_nll", "rep3", "rm_score", "n_tokens", "ended"):
        vals = [float(r[key]) for r in records if key in r]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def evaluate():
    name_ = name or os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))
    try:
        dev = pick_device(device)
        enc = load_tokenizer(tokenizer, 512)
        kinds_ = kinds.split(",") if kinds else (load_checkpoint(sft).get("kinds") if sft else None) or list(KINDS)
        data = InstructData(enc, data_dir or None, kinds_)
        policy = load_policy(checkpoint, dev)
        sft_model = load_policy(sft, dev) if sft else None
        ref_model = load_policy(reference, dev) if reference else None
        rm = load_policy(reward_model, dev, value_head=True) if reward_model else None
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    if policy.params.vocab_size != enc.n_words:
        fail(f"vocab mismatch: {checkpoint} has {policy.params.vocab_size} tokens, {tokenizer} {enc.n_words}")
    examples = data.heldout_examples(n_prompts)
    t0 = time.time()
    decode_fn = compile_decode(policy) if compile is True or (compile == "auto" and dev == "cpu") else None
    samples = sample_stories(policy, examples, enc, 1, temperature, batch_size, seed=seed, decode_fn=decode_fn)
    guard = guard_metrics(samples, enc, ref_model, sft_model, policy)
    rm_scores = reward_scores(rm, [s.example.prompt for s in samples], [s.response for s in samples]) if rm else None
    records = [sample_record(s, **g, **({"rm_score": rm_scores[i]} if rm else {}))
               for i, (s, g) in enumerate(zip(samples, guard))]
    result = {"name": name_, "checkpoint": checkpoint, **summarise(records), "temperature": temperature,
              "golds": [r["gold"] for r in records], "seconds": time.time() - t0}
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, f"samples_{name_}.jsonl"), records)
    with atomic_write(os.path.join(out_dir, f"eval_{name_}.json"), "w") as f:
        json.dump(result, f, indent=1)
    per = ", ".join(f"{k} {v['mean']:.3f}" for k, v in result["per_constraint"].items())
    print(f"{name_}: gold {result['gold']:.3f} [{result['gold_ci'][0]:.3f}, {result['gold_ci'][1]:.3f}] on "
          f"{len(records)} held-out prompts ({per}); kl_sft {result.get('kl_sft', float('nan')):.2f}, ref_nll "
          f"{result.get('ref_nll', float('nan')):.3f}, rep3 {result['rep3']:.3f}"
          + (f", rm {result['rm_score']:.3f}" if rm else "") + f" ({result['seconds']:.0f} s)")


# -----------------------------------------------------------------------------
# the report

def paired_diff_ci(a, b, n_boot=2000, seed=0):
    """Mean of a - b over paired prompts, with a percentile-bootstrap 95% interval."""
    d = [x - y for x, y in zip(a, b)]
    return bootstrap_ci(d, n_boot, seed)


def build_report(folder):
    evals = {}
    for path in sorted(glob.glob(os.path.join(folder, "eval_*.json"))):
        with open(path) as f:
            e = json.load(f)
        evals[e["name"]] = e
    if not evals:
        fail(f"no eval_*.json in {folder}: run evaluate.py on some checkpoints first")
    extra = {}
    for key in ("rm", "bon", "check", "timings"):
        path = os.path.join(folder, f"{key}.json") if key != "rm" else os.path.join(folder, "rm", "rm.json")
        if os.path.isfile(path):
            with open(path) as f:
                extra[key] = json.load(f)
    timings = os.path.join(folder, "timings.tsv")
    if os.path.isfile(timings):
        with open(timings) as f:
            extra["timings_s"] = {k: int(v) for k, v in (line.split("\t") for line in f if line.strip())}
    base = evals.get("sft")
    rows = []
    for name_, e in evals.items():
        row = {k: e.get(k) for k in ("name", "n", "gold", "gold_ci", "kl_sft", "ref_nll", "rep3", "rm_score",
                                     "n_tokens", "ended")}
        row["per_constraint"] = {k: v["mean"] for k, v in e["per_constraint"].items()}
        if base is not None and name_ != "sft" and len(e["golds"]) == len(base["golds"]):
            m, lo, hi = paired_diff_ci(e["golds"], base["golds"])
            row["gold_vs_sft"] = [m, lo, hi]
        if base is not None and e.get("ref_nll") is not None:
            row["ref_nll_vs_sft"] = e["ref_nll"] - base["ref_nll"]
        rows.append(row)
    rep = {"methods": rows, **extra}
    with atomic_write(os.path.join(folder, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)

    def fmt(x, p=3):
        return "–" if x is None else f"{x:.{p}f}"

    lines = ["# RLHF chain report", "", "Held-out prompts: shard 0, one story per prompt at temperature 1.", ""]
    kinds_seen = sorted({k for r in rows for k in r["per_constraint"]}, key=KINDS.index)
    lines += ["| method | gold [95% CI] | gold − SFT [95% CI] | " + " | ".join(kinds_seen) +
              " | KL to SFT (nats/story) | ref NLL (nats/tok) | Δ ref NLL | rep3 | RM score | tokens |",
              "|---|---|---|" + "---|" * len(kinds_seen) + "---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("gold_vs_sft")
        lines.append(f"| {r['name']} | {fmt(r['gold'])} [{fmt(r['gold_ci'][0])}, {fmt(r['gold_ci'][1])}] | "
                     + (f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "–") + " | "
                     + " | ".join(fmt(r["per_constraint"].get(k)) for k in kinds_seen)
                     + f" | {fmt(r['kl_sft'], 2)} | {fmt(r['ref_nll'])} | "
                     + (f"{r['ref_nll_vs_sft']:+.3f}" if r.get("ref_nll_vs_sft") is not None else "–")
                     + f" | {fmt(r['rep3'])} | {fmt(r['rm_score'])} | {fmt(r['n_tokens'], 0)} |")
    if "bon" in extra:
        b = extra["bon"]
        lines += ["", f"Best-of-n from one pool of {b['pool_size']} SFT samples per prompt ({b['n_prompts']} held-out "
                  "prompts); KL is the bound log n − (n−1)/n, not a measurement.", "",
                  "| n | KL bound (nats) | gold, picked by RM [95% CI] | RM score | gold, picked by gold (ceiling) | ref NLL | rep3 |",
                  "|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            lines.append(f"| {r['n']} | {r['kl_bound']:.2f} | {r['gold_by_rm']:.3f} [{r['gold_by_rm_ci'][0]:.3f}, "
                         f"{r['gold_by_rm_ci'][1]:.3f}] | {r['rm_by_rm']:.3f} | {r['gold_by_gold']:.3f} | "
                         f"{r['ref_nll_by_rm']:.3f} | {r['rep3_by_rm']:.3f} |")
    if "rm" in extra:
        m = extra["rm"]
        trivial = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in m["trivial"].items())
        lines += ["", f"Reward model: held-out accuracy {m['accuracy']:.3f} on {m['heldout_pairs']} pairs, "
                  f"{m['accuracy_clear']:.3f} on {m['heldout_clear_pairs']} clear pairs; best trivial predictor "
                  f"{m['best_trivial']:.3f} ({trivial}); "
                  f"Spearman with gold {m['spearman_gold']:.3f}."]
    if "timings_s" in extra:
        t = extra["timings_s"]
        lines += ["", f"Wall time of the stages (s): {', '.join(f'{k} {v}' for k, v in t.items())}; "
                  f"total {sum(t.values())} s."]
    with atomic_write(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_overoptimisation(folder, evals, extra.get("bon"))


def plot_overoptimisation(folder, evals, bon):
    """Gold and reward-model score against sqrt(KL to SFT): best-of-n (the KL bound), each RL run's
    checkpoints (eval names <method>@<iter>) as a curve from SFT, and every other method as one point."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {}
    for name_, e in evals.items():
        method = name_.split("@")[0]
        step = int(name_.split("@")[1]) if "@" in name_ else None
        if e.get("kl_sft") is not None and e.get("rm_score") is not None and (step is not None or name_ == "sft"):
            series.setdefault(method, []).append((step or 0, e))
    for method, pts in series.items():
        if method in evals:  # the run's final checkpoint, evaluated under the method's plain name
            pts.append((10 ** 9, evals[method]))
    for method, pts in series.items():
        if method == "sft" or len(pts) < 2:
            continue
        if "sft" in evals and evals["sft"].get("rm_score") is not None:
            pts = [(0, evals["sft"])] + pts
        pts.sort(key=lambda p: p[0])
        x = [math.sqrt(max(0.0, p[1]["kl_sft"])) for p in pts]
        axes[0].plot(x, [p[1]["gold"] for p in pts], "o-", label=method)
        axes[1].plot(x, [p[1]["rm_score"] for p in pts], "o-", label=method)
    for name_, e in evals.items():  # the other methods' final checkpoints: one point each
        if "@" in name_ or name_ in series or name_ in ("sft", "pretrained") or e.get("rm_score") is None:
            continue
        x = math.sqrt(max(0.0, e["kl_sft"]))
        axes[0].plot([x], [e["gold"]], "^", label=name_)
        axes[1].plot([x], [e["rm_score"]], "^", label=name_)
    if bon:
        x = [math.sqrt(r["kl_bound"]) for r in bon["rows"]]
        axes[0].plot(x, [r["gold_by_rm"] for r in bon["rows"]], "s--", label="best-of-n by RM (KL bound)")
        axes[0].plot(x, [r["gold_by_gold"] for r in bon["rows"]], ":", color="grey", label="best-of-n by gold (ceiling)")
        axes[1].plot(x, [r["rm_by_rm"] for r in bon["rows"]], "s--", label="best-of-n by RM (KL bound)")
    axes[0].set_ylabel("held-out gold")
    axes[1].set_ylabel("reward-model score")
    for ax in axes:
        ax.set_xlabel("sqrt(KL to SFT)  (nats^0.5 per story)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(folder, "overoptimisation.png")
    fig.savefig(path, dpi=110)
    print(f"plotted {path}")


if __name__ == "__main__":
    if report:
        build_report(report)
    else:
        evaluate()
