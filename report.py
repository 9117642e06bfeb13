"""
Plots and reports: the PPO curves of train.py --ppo=True (plot_ppo_metrics; several runs: plot_ppo_runs), and
the RLHF chain's report (build_report: report.json, report.md and the over-optimisation figure from a folder of
rlhf/evaluate.py results, the reward model's rm.json, rlhf/best_of_n.py's bon.json and the pilot). matplotlib is optional:
without it the tables are still written and the plots are skipped.

    python -m rlhf.evaluate --report=out/rlhf     # the chain's report (rlhf/run_cpu.sh runs it last)
    python -c "import report; report.plot_ppo_metrics('stories260K/metrics.jsonl', 'ppo.png', 200)"
    python bench/ppo_summary.py --targets --plot=seeds.png "seed 1=s1/metrics.jsonl" ...   # plot_ppo_runs
"""
import glob
import json
import math
import os

from stats import paired_diff_ci
from utils import atomic_write, fail, read_jsonl


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# -----------------------------------------------------------------------------
# PPO (train.py --ppo=True)

def plot_ppo_metrics(metrics_path, png_path, target_len=None, band=10):
    """Per PPO iteration: length (with the target +- band), reward, KL to the reference, entropy, the
    rollouts' NLL under the reference and their repeated-3-gram rate, as a PNG. matplotlib is optional:
    returns False without it. Also usable on its own:
    python -c "import report; report.plot_ppo_metrics('out/metrics.jsonl', 'ppo.png', 200)"."""
    plt = pyplot()
    if plt is None or not os.path.isfile(metrics_path):
        return False
    with open(metrics_path) as f:
        rows = [r for r in map(json.loads, f) if "reward_mean" in r]
    if not rows:
        return False
    it = [r["iter"] - rows[0]["iter"] for r in rows]
    panels = [("length_mean", "mean story length (tokens)"), ("reward_mean", "mean reward (score)"),
              ("kl_ref", "KL to the reference (nats/story)"), ("entropy", "policy entropy (nats/token)"),
              ("rollout/ref_nll", "rollouts' NLL under the reference (nats/token)"),
              ("rep3_rate", "repeated 3-grams (fraction)")]
    panels = [(k, label) for k, label in panels if k in rows[0]]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, label) in zip(axes.flat, panels):
        ax.plot(it, [r[key] for r in rows], marker=".")
        ax.set_xlabel("PPO iteration")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if target_len is not None:
        axes[0, 0].axhspan(target_len - band, target_len + band, color="green", alpha=0.15,
                           label=f"{target_len} +- {band}")
        axes[0, 0].axhline(target_len, color="gray", linestyle="--", linewidth=0.8)
        axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def plot_ppo_runs(runs, png_path, target_len, band=10, outer=20):
    """Several PPO runs (e.g. seeds) on one figure, {label: metrics.jsonl}: the mean length with the band and the outer
    band, the KL to the reference, the KL coefficient and the entropy. Returns False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    panels = [("length_mean", "mean story length (tokens)"), ("kl_ref", "KL to the reference (nats/story)"),
              ("kl_coef", "KL coefficient beta"), ("entropy", "policy entropy (nats/token)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8))
    for label, path in runs.items():
        with open(path) as f:
            rows = [r for r in map(json.loads, f) if "reward_mean" in r]
        it = [r["iter"] - rows[0]["iter"] for r in rows]
        for ax, (key, _) in zip(axes, panels):
            ax.plot(it, [r.get(key, math.nan) for r in rows], linewidth=1.2, label=label)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xlabel("PPO iteration")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].axhspan(target_len - outer, target_len + outer, color="orange", alpha=0.10, label=f"{target_len} ± {outer}")
    axes[0].axhspan(target_len - band, target_len + band, color="green", alpha=0.18, label=f"{target_len} ± {band}")
    axes[0].set_ylim(target_len - 3 * outer, target_len + 5 * outer)
    axes[0].legend(handles=axes[0].patches, fontsize=8, loc="upper right")
    axes[1].axhline(10, color="gray", linestyle="--", linewidth=0.8)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncol=min(len(runs), 4), fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# the RLHF chain

FIRST = ("pretrained", "sft", "dpo", "ppo_rm", "grpo_rm", "grpo_gold")


def report_order(name):
    """The report's rows: the baselines and single methods first, then each run's checkpoints by iteration and its
    final one last."""
    method, _, step = name.partition("@")
    rank = FIRST.index(method) if method in FIRST else len(FIRST)
    return rank, method, int(step) if step else 10 ** 9


def read_evals(folder):
    """{name: evaluation} from every eval_*.json in folder (the chain's and the reasoning study's evaluations)."""
    evals = {}
    for path in glob.glob(os.path.join(folder, "eval_*.json")):
        with open(path) as f:
            e = json.load(f)
        evals[e["name"]] = e
    return evals


def build_report(folder):
    evals = read_evals(folder)
    if not evals:
        fail(f"no eval_*.json in {folder}: run `python -m rlhf.evaluate` on some checkpoints first")
    evals = dict(sorted(evals.items(), key=lambda kv: report_order(kv[0])))
    extra = {}
    for key in ("rm", "bon", "check", "pilot"):
        path = os.path.join(folder, f"{key}.json") if key != "rm" else os.path.join(folder, "rm", "rm.json")
        if os.path.isfile(path):
            with open(path) as f:
                extra[key] = json.load(f)
    timings = read_timings(folder)
    if timings:
        extra["timings_s"] = {k: round(v) for k, v in timings.items()}
    base = evals.get("sft")
    rows = []
    for name_, e in evals.items():
        row = {k: e.get(k) for k in ("name", "n", "gold", "gold_ci", "kl_sft", "ref_nll", "rep3", "rm_score",
                                     "n_tokens", "ended")}
        row["components"] = {k: v["mean"] for k, v in e["components"].items()}
        if base is not None and name_ != "sft" and len(e["golds"]) == len(base["golds"]):
            m, lo, hi = paired_diff_ci(e["golds"], base["golds"])
            row["gold_vs_sft"] = [m, lo, hi]
        if base is not None and e.get("ref_nll") is not None:
            row["ref_nll_vs_sft"] = e["ref_nll"] - base["ref_nll"]
        rows.append(row)
    pre = evals.get("pretrained")
    if pre is not None and base is not None and len(pre["golds"]) == len(base["golds"]):
        extra["sft_vs_pretrained"] = list(paired_diff_ci(base["golds"], pre["golds"]))
    extra["targets"] = targets(evals, extra)
    extra["peaks"] = peaks(evals)
    rep = {"methods": rows, **extra}
    with atomic_write(os.path.join(folder, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)

    def fmt(x, p=3):
        return "–" if x is None else f"{x:.{p}f}"

    lines = ["# RLHF chain report", ""]
    if "pilot" in extra:
        p = extra["pilot"]
        comps = [c for c in next(v for v in p.values() if isinstance(v, dict)) if c not in ("gold", "tokens")]
        lines += ["Pilot: each gold component's rate on the real held-out continuations (cut at the budget) and on the "
                  f"pre-trained model's samples for the same prompts ({p.get('prompts with a name', 0):.0%} of the "
                  "prompts carry a name).", "",
                  "| source | " + " | ".join(comps) + " | gold | tokens |", "|---|" + "---|" * (len(comps) + 2)]
        for source, r in p.items():
            if isinstance(r, dict):
                lines.append(f"| {source} | " + " | ".join(f"{r[c]:.3f}" for c in comps)
                             + f" | {r['gold']:.3f} | {r['tokens']:.0f} |")
        lines.append("")
    lines += [f"Task {next(iter(evals.values())).get('task', 'story')}; held-out prompts: "
             "shard 0, one story per prompt at temperature 1.", ""]
    kinds_seen = list(dict.fromkeys(k for r in rows for k in r["components"]))
    lines += ["| method | gold [95% CI] | gold − SFT [95% CI] | " + " | ".join(kinds_seen) +
              " | KL to SFT (nats/story) | ref NLL (nats/tok) | Δ ref NLL | rep3 | RM score | tokens |",
              "|---|---|---|" + "---|" * len(kinds_seen) + "---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("gold_vs_sft")
        lines.append(f"| {r['name']} | {fmt(r['gold'])} [{fmt(r['gold_ci'][0])}, {fmt(r['gold_ci'][1])}] | "
                     + (f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "–") + " | "
                     + " | ".join(fmt(r["components"].get(k)) for k in kinds_seen)
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
        per = ", ".join(f"{c} {v['accuracy']:.3f} ({v['pairs']} pairs)" for c, v in m.get("per_component", {}).items())
        lines += ["", f"Reward model: held-out accuracy {m['accuracy']:.3f} on {m['heldout_pairs']} pairs, "
                  f"{m['accuracy_clear']:.3f} on {m['heldout_clear_pairs']} clear pairs; best trivial predictor "
                  f"{m['best_trivial']:.3f} ({trivial}); "
                  f"Spearman with gold {m['spearman_gold']:.3f}." + (f" Per component: {per}." if per else "")]
    for method, pk in extra["peaks"].items():
        if pk["after"] is None:
            p = pk["peak"]
            lines += ["", f"Over-optimisation, {method}: no peak within the run: gold is highest at its last checkpoint "
                      f"(gold {p['gold']:.3f}, KL {p['kl_sft']:.1f} nats, RM {p['rm_score']:.3f})."]
            continue
        lines += ["", f"Over-optimisation, {method}: gold peaks at {pk['peak']['name']} (gold {pk['peak']['gold']:.3f}, "
                  f"KL {pk['peak']['kl_sft']:.1f} nats, RM {pk['peak']['rm_score']:.3f})"
                  + (f"; before it {pk['before']['name']} (gold {pk['before']['gold']:.3f}, KL {pk['before']['kl_sft']:.1f},"
                     f" RM {pk['before']['rm_score']:.3f})" if pk.get("before") else "")
                  + f"; after it {pk['after']['name']} (gold {pk['after']['gold']:.3f}, KL {pk['after']['kl_sft']:.1f}, "
                    f"RM {pk['after']['rm_score']:.3f})"
                  + f"; the RM score {'keeps rising' if pk['proxy_rises_after_peak'] else 'does not keep rising'} "
                  "after the peak."]
    if extra["targets"]:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in extra["targets"]]
    if "timings_s" in extra:
        t = extra["timings_s"]
        stages = {k: v for k, v in t.items() if k != "wall"}
        lines += ["", f"Time of the stages (s): {', '.join(f'{k} {v}' for k, v in stages.items())}; "
                  f"their sum {sum(stages.values())} s" + (f", wall clock {t['wall']} s." if "wall" in t else ".")]
    with atomic_write(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_overoptimisation(folder, evals, extra.get("bon"))


def run_points(evals):
    """{method: [(iteration, eval), ...]} of the RL runs evaluated along the way (names <method>@<iter>), each
    from SFT (iteration 0) to its final checkpoint (evaluated under the method's plain name)."""
    series = {}
    for name_, e in evals.items():
        if "@" in name_ and e.get("kl_sft") is not None and e.get("rm_score") is not None:
            method, step = name_.split("@")
            series.setdefault(method, []).append((int(step), e))
    for method, pts in series.items():
        if method in evals:
            pts.append((10 ** 9, evals[method]))
        if "sft" in evals and evals["sft"].get("rm_score") is not None:
            pts.append((0, evals["sft"]))
        pts.sort(key=lambda p: p[0])
    return series


def peaks(evals):
    """Where gold peaks along each RL run, with the checkpoints before and after it, and whether the proxy
    (the RM score) still rises past the peak."""
    out = {}
    for method, pts in run_points(evals).items():
        i = max(range(len(pts)), key=lambda k: pts[k][1]["gold"])
        pick = lambda e: {k: e.get(k) for k in ("name", "gold", "kl_sft", "rm_score")}
        out[method] = {"peak": pick(pts[i][1]), "before": pick(pts[i - 1][1]) if i > 0 else None,
                       "after": pick(pts[i + 1][1]) if i + 1 < len(pts) else None,
                       "proxy_rises_after_peak": i + 1 < len(pts) and pts[-1][1]["rm_score"] > pts[i][1]["rm_score"]}
    return out


def targets(evals, extra):
    """The chain's targets against what was measured (the story task's list, docs/rlhf-chain.md)."""
    out = []
    sft, pre = evals.get("sft"), evals.get("pretrained")

    def add(target, measured, met):
        out.append({"target": target, "measured": measured, "met": bool(met)})
    if "sft_vs_pretrained" in extra:
        m, lo, hi = extra["sft_vs_pretrained"]
        add("SFT gold >= pre-trained + 0.05, CI excluding 0", f"{sft['gold']:.3f} vs {pre['gold']:.3f}: {m:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}]", m >= 0.05 and lo > 0)
    if "rm" in extra:
        r = extra["rm"]
        add("RM held-out accuracy >= 0.75 (non-tied pairs)", f"{r['accuracy']:.3f} on {r['heldout_pairs']} pairs",
            r["accuracy"] >= 0.75)
        add("RM accuracy >= 0.85 on pairs whose gold differs by >= 0.25",
            f"{r['accuracy_clear']:.3f} on {r['heldout_clear_pairs']} pairs", r["accuracy_clear"] >= 0.85)
        add("RM >= best trivial predictor + 0.05", f"{r['accuracy']:.3f} vs {r['best_trivial']:.3f}",
            r["accuracy"] >= r["best_trivial"] + 0.05)
    for name_ in ("dpo", "ppo_rm", "grpo_rm", "grpo_gold"):
        e = evals.get(name_)
        if e is None or sft is None or len(e["golds"]) != len(sft["golds"]):
            continue
        m, lo, hi = paired_diff_ci(e["golds"], sft["golds"])
        add(f"{name_}: gold >= SFT + 0.10 (CI excluding 0) at KL to SFT <= 15", f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] at "
            f"KL {e['kl_sft']:.1f}", m >= 0.10 and lo > 0 and e["kl_sft"] <= 15)
    if "bon" in extra and sft is not None:
        rows = [r for r in extra["bon"]["rows"] if r["n"] == 16]
        if rows:
            one = extra["bon"]["rows"][0]["gold_by_rm"]
            add("best-of-16 by the RM >= SFT + 0.05", f"{rows[0]['gold_by_rm']:.3f} vs best-of-1 (SFT) {one:.3f}",
                rows[0]["gold_by_rm"] >= one + 0.05)
    if "timings_s" in extra:  # the wall clock where the run logged it, else the stages' sum
        t = extra["timings_s"]
        stages_sum = sum(v for k, v in t.items() if k != "wall")
        total = t.get("wall", stages_sum)
        add("the chain in <= 30 minutes", f"{total / 60:.1f} min wall clock (the stages' sum: {stages_sum / 60:.1f})"
            if "wall" in t else f"{total / 60:.1f} min (the stages' sum)", total <= 1800)
    return out


def plot_overoptimisation(folder, evals, bon):
    """Gold and reward-model score against sqrt(KL to SFT): best-of-n (the KL bound), each RL run's
    checkpoints (eval names <method>@<iter>) as a curve from SFT, and every other method as one point."""
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    series = run_points(evals)
    for method, pts in series.items():
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
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    path = os.path.join(folder, "overoptimisation.png")
    fig.savefig(path, dpi=110)
    print(f"plotted {path}")


# -----------------------------------------------------------------------------
# the reasoning study (rlhf/reason_cpu.sh)

REASON_METHODS = ("grpo", "grpo_kl", "drgrpo", "drgrpo_kl", "rloo", "rloo_kl", "ppo", "ppo_kl")


def read_timings(folder):
    """{stage: seconds} from the run's timings.tsv (the last time of each stage; "wall": the sum over invocations)."""
    out = {}
    path = os.path.join(folder, "timings.tsv")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                stage, _, seconds = line.strip().partition("\t")
                if seconds:
                    out[stage] = float(seconds) + (out.get(stage, 0.0) if stage == "wall" else 0.0)
    return out


def catch_up_k(base, best):
    """The smallest k at which the base's pass@k reaches the best method's, or None within the k measured."""
    ks = sorted(set(map(int, base["pass_at_k"])) & set(map(int, best["pass_at_k"])))
    return next((k for k in ks if base["pass_at_k"][str(k)] >= best["pass_at_k"][str(k)]), None)


def build_reason_report(folder):
    """report.json, report.md and the figures of the reasoning study from the eval_*.json in folder."""
    evals = read_evals(folder)
    if "base" not in evals:
        fail(f"no eval_base.json in {folder}: run `python -m rlhf.reason_eval --name=base ...` first")
    base = evals["base"]
    timings = read_timings(folder)
    methods = [m for m in REASON_METHODS if m in evals] + sorted(
        m for m in evals if "@" not in m and m != "base" and m not in REASON_METHODS)
    rows = {}
    for m in ["base"] + methods:
        e = evals[m]
        row = {k: e.get(k) for k in ("pass1", "pass1_ci", "greedy", "format", "n_tokens", "think_tokens",
                                     "no_working", "kl_base", "ood")}
        row["pass_at_k"] = {k: e["pass_at_k"][k] for k in e["pass_at_k"]}
        if m != "base":
            row["lift"] = paired_diff_ci(e["pass1_per_problem"], base["pass1_per_problem"])
            row["train_s"] = timings.get(m)
        rows[m] = row
    best = max(methods, key=lambda m: evals[m]["pass1"]) if methods else None
    lifted = [m for m in methods if rows[m]["lift"][0] >= 0.25 and rows[m]["lift"][1] > 0]
    k_catch = catch_up_k(base, evals[best]) if best else None
    k_match = next((int(k) for k in sorted(base["pass_at_k"], key=int)  # k samples of the base ~ one of the best
                    if base["pass_at_k"][k] >= evals[best]["pass1"]), None) if best else None
    stages_sum = sum(v for k, v in timings.items() if k != "wall")
    total = timings.get("wall", stages_sum)
    targets_ = [
        {"target": "held-out pass@1 of the base at temperature 1 in [0.15, 0.6]", "measured": f"{base['pass1']:.3f}",
         "met": 0.15 <= base["pass1"] <= 0.6},
        {"target": "at least two RL methods lift pass@1 by >= +0.25, CI excluding 0",
         "measured": ", ".join(f"{m} {rows[m]['lift'][0]:+.3f}" for m in lifted) or "none", "met": len(lifted) >= 2},
        {"target": "format rate >= 0.95 after RL (the methods that lift pass@1)",
         "measured": ", ".join(f"{m} {rows[m]['format']:.3f}" for m in lifted) or "-",
         "met": bool(lifted) and all(rows[m]["format"] >= 0.95 for m in lifted)},
        {"target": "the whole run in <= 20 minutes", "measured": f"{total / 60:.1f} min wall clock (the stages' sum: "
         f"{stages_sum / 60:.1f} min)",
         "met": 0 < total <= 1200}]
    result = {"methods": rows, "best": best, "base_catches_up_at_k": k_catch,
              "base_k_for_best_pass1": k_match, "targets": targets_,
              "timings_s": timings, "curves": reason_curves(folder, methods)}
    with atomic_write(os.path.join(folder, "report.json"), "w") as f:
        json.dump(result, f, indent=1)
    kmax = max(map(int, base["pass_at_k"]))
    ks = [k for k in (1, 4, 16, 64) if k <= kmax]
    lines = ["# Reasoning from scratch: RL with verifiable rewards on integer arithmetic", "",
             f"Held-out: {base['problems']} problems never trained on, {base['samples_per_problem']} samples each at "
             "temperature 1 (pass@k by the unbiased estimator), one greedy; differences paired over the same "
             "problems with 95% bootstrap intervals; KL to the base in nats per response; OOD: an operand one digit "
             "longer than any trained on.", "",
             "| method | pass@1 [95% CI] | − base [95% CI] | greedy | " + " | ".join(f"pass@{k}" for k in ks[1:])
             + " | format | tokens | working | no working | KL to base | OOD pass@1 | OOD greedy | train s |",
             "|---|---|---|---|" + "---|" * (len(ks) - 1) + "---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        lift = "–" if m == "base" else f"{r['lift'][0]:+.3f} [{r['lift'][1]:+.3f}, {r['lift'][2]:+.3f}]"
        ood = r.get("ood") or {}
        lines.append(
            f"| {m} | {r['pass1']:.3f} [{r['pass1_ci'][0]:.3f}, {r['pass1_ci'][1]:.3f}] | {lift} | {r['greedy']:.3f} | "
            + " | ".join(f"{r['pass_at_k'][str(k)]:.3f}" for k in ks[1:])
            + f" | {r['format']:.3f} | {r['n_tokens']:.1f} | {r['think_tokens']:.1f} | {r['no_working']:.3f} | "
            f"{r['kl_base'] if r.get('kl_base') is not None else 0:.2f} | {ood.get('pass1', float('nan')):.3f} | "
            f"{ood.get('greedy', float('nan')):.3f} | {r.get('train_s') or 0:.0f} |")
    if best:
        lines += ["", f"The best method by pass@1 is **{best}**. " + (
            f"The base's pass@k reaches {best}'s pass@k at k = {k_catch}." if k_catch else
            f"The base's pass@k stays below {best}'s pass@k at every k up to {kmax}.") + (
            f" The base needs k = {k_match} samples to match {best}'s pass@1." if k_match else
            f" No k up to {kmax} lets the base match {best}'s pass@1.")]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in targets_]
    with atomic_write(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_reason(folder, evals, result["curves"], best)


def reason_curves(folder, methods):
    """{method: {"iter": [...], "pass1": [...], "tokens": [...], "working": [...]}} per RL iteration, from each run's
    metrics.jsonl: the correct rate of its rollouts (pass@1 at temperature 1 on problems it had not trained on
    before), their length and the working's length."""
    curves = {}
    for m in methods:
        rows = read_jsonl(os.path.join(folder, m, "metrics.jsonl"))
        if rows and "correct" in rows[0]:
            curves[m] = {"iter": [r["iter"] for r in rows], "pass1": [r["correct"] for r in rows],
                         "tokens": [r["length"] if "length" in r else r.get("response_length_mean") for r in rows],
                         "working": [r.get("think_tokens") for r in rows]}
    return curves


def plot_reason(folder, evals, curves, best):
    """reason_curves.png: the rollouts' pass@1, response length and <think> length against iteration per method;
    reason_pass_at_k.png: pass@k of the base and of the best method."""
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no figures (pip install matplotlib)")
        return
    def smooth(values, window=5):  # the mean of the last `window` iterations: 128 rollouts each are noisy
        out = []
        for i in range(len(values)):
            known = [v for v in values[max(0, i - window + 1): i + 1] if v is not None]
            out.append(sum(known) / len(known) if known else float("nan"))  # nan: a gap (a key not logged)
        return out

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (method, c) in enumerate(sorted(curves.items())):
        style = dict(color=f"C{i // 2}", linestyle="--" if method.endswith("_kl") else "-", label=method)
        for ax, key in zip(axes, ("pass1", "tokens", "working")):
            ax.plot(c["iter"], smooth(c[key]), **style)
    axes[0].set_title("each point: the mean of the last 5 iterations' rollouts", fontsize=9, loc="left")
    axes[0].set_ylabel("pass@1 of the rollouts (temperature 1)")
    axes[1].set_ylabel("response length (tokens)")
    axes[2].set_ylabel("<think> length (tokens)")
    for ax in axes:
        ax.set_xlabel("RL iteration")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "reason_curves.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name_ in ["base"] + ([best] if best else []):
        pk = evals[name_]["pass_at_k"]
        ks = sorted(map(int, pk))
        ax.plot(ks, [pk[str(k)] for k in ks], "o-", markersize=3, label=name_)
    if best:  # where k samples of the base match one of the best method
        ax.axhline(evals[best]["pass1"], color="grey", linestyle=":", linewidth=1, label=f"{best}: pass@1")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("held-out pass@k")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "reason_pass_at_k.png"), dpi=110)
    plt.close(fig)
    print(f"plotted {folder}/reason_curves.png and reason_pass_at_k.png")
