"""
One PPO iteration of the seed's command, this repository against the seed's reference implementation
(schinger/FullLLM's model.py and ppo.py, run from a clone; nothing is copied from it) in the same run:
the rollouts (400 queries of 1-30 tokens, up to 300 new tokens each, temperature 1) and the PPO step (the
no-grad forwards of policy and reference, rewards and advantages, 4 epochs x 8 minibatches of 50 with
AdamW) timed separately. Both steps get the same 400 rollouts, the same initial weights (stories260K plus
one value head) and the seed's settings: lr 1e-4, betas (0.9, 0.99), weight decay 0.01, grad clip 1,
init_kl_coef 0.2, mini-batch 50, 4 epochs. Early stopping is off on both sides so that both always do the
same 32 minibatches (the reference stops on the last minibatch's policy KL, ours on the epoch's mean).

    git clone https://github.com/schinger/FullLLM /tmp/FullLLM    # the baseline
    python bench/bench_ppo.py                       # ~20 minutes on 2 CPU cores
    python bench/bench_ppo.py --parts=step --kinds=ours,ours_compiled --runs=3

Kinds: reference (eager), reference_compiled (the seed's --compile=True: its train.py compiles the policy and
deep-copies it as the reference model; its rollouts stay eager), ours (eager), ours_compiled (train.py
--compile=True: the training forward and the rollouts' decode step compiled). Each run starts from the same
weights and a fresh optimizer, so every run does the same work; the first run of each kind is a warm-up (it
includes compiling) and is reported separately.

The reference runs as its users get it: in a process of its own, with the system's malloc as it comes. Ours keeps freed
memory in the process (cpu_kernels.keep_freed_memory, on import); --reference_malloc=kept gives the reference that
too (one process), which separates the allocator's share of the ratio from the code's.
"""
import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import print_table  # noqa: E402
from cpu_kernels import KEEPS_FREED_MEMORY  # noqa: E402
from generate import compile_decode, generate_withcache  # noqa: E402
from ppo import PPOConfig, PPOTrainer  # noqa: E402
from rlhf.common import load_policy  # noqa: E402
from tasks.length import LengthReward, LengthSampler  # noqa: E402

KINDS = ("reference", "reference_compiled", "ours", "ours_compiled")
ROLLOUTS, MINI_BATCH, EPOCHS, MAX_GEN_LEN, START_LEN, TARGET_LEN, BOS = 400, 50, 4, 300, 30, 200, 1


def load_reference(path):
    """The reference's model.py and ppo.py as modules (ppo.py imports tyro only for a type annotation of
    its config: a stand-in is enough), or None when there is no clone at path."""
    if not os.path.isfile(os.path.join(path, "ppo.py")):
        return None
    if "tyro" not in sys.modules:
        class Suppress:
            def __class_getitem__(cls, item):
                return item
        sys.modules["tyro"] = types.SimpleNamespace(conf=types.SimpleNamespace(Suppress=Suppress))
    modules = []
    for name in ("model", "ppo"):
        spec = importlib.util.spec_from_file_location(f"reference_{name}", os.path.join(path, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return types.SimpleNamespace(model=modules[0], ppo=modules[1])


class PadOnly:
    """The one tokenizer method the reference's PPOTrainer.step calls: right-pad input_ids/attention_mask."""

    def pad(self, rows):
        n = max(len(r["input_ids"]) for r in rows)
        out = {k: torch.zeros(len(rows), n, dtype=torch.long) for k in ("input_ids", "attention_mask")}
        for i, r in enumerate(rows):
            for k in out:
                out[k][i, : len(r[k])] = r[k]
        return out


def make_queries(policy, seed=0):
    """400 queries as the seed draws them: BOS + the first 0..29 tokens of a story (here the model's own
    stories, sampled once, so that the benchmark needs no dataset)."""
    torch.manual_seed(seed)
    stories = generate_withcache(policy, [[BOS]] * ROLLOUTS, START_LEN, temperature=1.0, eos_id=BOS)
    length = LengthSampler(0, START_LEN, seed=seed)
    return [([BOS] + s)[: length() + 1] for s in stories]


def reference_models(reference, policy, compiled):
    """The reference's TransformerWithValueHead with our weights (same names), cache on as its train.py sets
    it for PPO; the KL reference is a deep copy, as there (after torch.compile when compiled)."""
    cfg = {k: getattr(policy.params, k) for k in
           ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len", "norm_eps")}
    model = reference.model.TransformerWithValueHead(reference.model.ModelArgs(**cfg, cache=True))
    missing, unexpected = model.load_state_dict(policy.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("cache_k", "cache_v")) for k in missing), (missing, unexpected)
    if compiled:
        model = torch.compile(model)
    ref_model = copy.deepcopy(model)
    ref_model.requires_grad_(False)
    return model, ref_model


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="/tmp/FullLLM", help="a clone of github.com/schinger/FullLLM")
    parser.add_argument("--checkpoint", default=os.path.join(ROOT, "stories260K", "stories260K.pt"))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--parts", default="rollouts,step")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per kind, after one warm-up run")
    parser.add_argument("--reference_malloc", default="system", choices=("system", "kept"),
                        help="system: the reference in a process of its own with the system's malloc as it comes "
                             "(as its users run it); kept: in this process, keeping freed memory as ours does")
    parser.add_argument("--results_json", help=argparse.SUPPRESS)  # a child process's results, for its parent
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    parts = args.parts.split(",")
    if set(kinds) - set(KINDS) or set(parts) - {"rollouts", "step"} or args.runs < 1:
        parser.error(f"--kinds from {','.join(KINDS)}, --parts from rollouts,step, --runs >= 1")
    reference = load_reference(args.reference)
    if reference is None and any(k.startswith("reference") for k in kinds):
        sys.exit(f"no reference at {args.reference}: `git clone https://github.com/schinger/FullLLM {args.reference}`"
                 " (or leave the reference kinds out of --kinds)")
    rows, results = [], {}
    reference_kinds = [k for k in kinds if k.startswith("reference")]
    if reference_kinds and args.reference_malloc == "system" and KEEPS_FREED_MEMORY:
        rows, results = reference_in_own_process(args, reference_kinds)
        kinds = [k for k in kinds if k not in reference_kinds]
    own_rows, own_results = measure(args, reference, kinds, parts)
    rows, results = rows + own_rows, {**results, **own_results}
    if args.results_json:
        with open(args.results_json, "w") as f:
            json.dump({"rows": rows, "results": [[k, p, s] for (k, p), s in results.items()]}, f)
        return
    kinds = args.kinds.split(",")
    baseline = {part: min((results[k, part] for k in kinds if k.startswith("reference") and (k, part) in results),
                          default=None) for part in parts}
    for row in rows:
        base_s = baseline[row[1]]
        row.append(f"{base_s / results[row[0], row[1]]:.2f}x" if base_s else "-")
    if all(baseline[p] for p in parts) and len(parts) == 2:
        for kind in kinds:
            total = sum(results[kind, p] for p in parts)
            rows.append([kind, "iteration", "-", f"{total:.1f}", "-", f"{sum(baseline.values()) / total:.2f}x"])
    malloc = ("the system's malloc as it comes" if args.reference_malloc == "system" or not KEEPS_FREED_MEMORY
              else "freed memory kept, as ours")
    print_table(f"One PPO iteration of the seed's command, seconds (median of {args.runs} runs after a warm-up; "
                f"ratio: the faster reference kind / this kind; the reference with {malloc})",
                ["kind", "part", "warm-up s", "median s", "runs s", "speed-up vs reference"], rows)


def reference_in_own_process(args, kinds):
    """The reference kinds measured by this script in a child process whose malloc is the system's as it comes (ours
    would otherwise apply to the whole process). Returns its (rows, results)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, os.path.abspath(__file__), f"--kinds={','.join(kinds)}", f"--parts={args.parts}",
               f"--runs={args.runs}", f"--reference={args.reference}", f"--checkpoint={args.checkpoint}",
               f"--results_json={out}"]
        subprocess.run(cmd, check=True, env={**os.environ, "FULLLLM_SYSTEM_MALLOC": "1"})
        with open(out) as f:
            child = json.load(f)
    return child["rows"], {(k, p): s for k, p, s in child["results"]}


def measure(args, reference, kinds, parts):
    """Each kind's parts: warm-up and timed runs. Returns (table rows, {(kind, part): median seconds})."""
    if not kinds:
        return [], {}
    base = load_policy(args.checkpoint, value_head=True)
    torch.manual_seed(0)
    torch.nn.init.normal_(base.value_head.weight, std=0.02)  # the same value head for every kind
    queries = make_queries(base)
    torch.manual_seed(1)
    responses = generate_withcache(base, queries, MAX_GEN_LEN, temperature=1.0, eos_id=BOS, keep_stop_token=True)
    ended = [len(r) > 0 and r[-1] == BOS for r in responses]
    reward = LengthReward(TARGET_LEN)
    scores = [reward(len(q) + len(r) - e) for q, r, e in zip(queries, responses, ended)]
    new_tokens = sum(len(r) for r in responses)
    print(f"{ROLLOUTS} rollouts, {new_tokens:,} new tokens, story length mean "
          f"{sum(len(q) + len(r) for q, r in zip(queries, responses)) / ROLLOUTS:.0f}", flush=True)
    q_t = [torch.tensor(q) for q in queries]
    r_t = [torch.tensor(r) for r in responses]
    s_t = [torch.tensor(s) for s in scores]

    def setup(kind):
        """(policy, trainer, rollout function) from the initial weights, with a fresh optimizer."""
        compiled = kind.endswith("compiled")
        if kind.startswith("reference"):
            model, ref_model = reference_models(reference, base, compiled)
            raw = getattr(model, "_orig_mod", model)
            opt = raw.configure_optimizers(0.01, 1e-4, (0.9, 0.99), "cpu")
            conf = reference.ppo.PPOConfig(init_kl_coef=0.2, kl_penalty="kl", target_kl=0.2, early_stopping=False,
                                           learning_rate=1e-4, max_grad_norm=1.0, gradient_accumulation_steps=1,
                                           mini_batch_size=MINI_BATCH, backward_batch_size=MINI_BATCH,
                                           batch_size=ROLLOUTS)
            trainer = reference.ppo.PPOTrainer(conf, model, ref_model.eval(), PadOnly(), opt,
                                               torch.amp.GradScaler("cpu", enabled=False), False)

            def rollouts():  # its train.py: chunks of max_batch_size (32), the uncompiled module's method
                raw.eval()
                out = []
                for i in range(0, ROLLOUTS, raw.params.max_batch_size):
                    out += raw.generate_withcache(queries[i: i + raw.params.max_batch_size], MAX_GEN_LEN,
                                                  temperature=1.0, top_k=0, top_p=1.0, eos_id=BOS, echo=False,
                                                  device="cpu")
                return out
            return trainer, rollouts
        policy = copy.deepcopy(base).train()
        ref_model = load_policy(args.checkpoint).requires_grad_(False)
        opt = policy.configure_optimizers(0.01, 1e-4, (0.9, 0.99), "cpu")
        conf = PPOConfig(init_kl_coef=0.2, batch_size=ROLLOUTS, mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS,
                         max_grad_norm=1.0, early_stopping=False)
        trainer = PPOTrainer(conf, torch.compile(policy) if compiled else policy, ref_model, opt)
        decode_fn = compile_decode(policy) if compiled else None

        def rollouts():
            policy.eval()
            out = generate_withcache(policy, queries, MAX_GEN_LEN, temperature=1.0, eos_id=BOS, decode_fn=decode_fn,
                                     keep_stop_token=True)
            policy.train()
            return out
        return trainer, rollouts

    rows = []
    results = {}
    for kind in kinds:
        for part in parts:
            firsts, times, extra = [], [], ""
            for run in range(args.runs + 1):
                trainer, rollouts = setup(kind)
                torch.manual_seed(2 + run)
                if part == "rollouts":
                    dt, out = timed(rollouts)
                    extra = f"{sum(len(r) for r in out) / dt:,.0f} tok/s"
                else:
                    dt, stats = timed(lambda: trainer.step(q_t, r_t, s_t))
                    fwd = stats.get("time/ppo/forward_pass", float("nan"))
                    opt_s = stats.get("time/ppo/optimize_step", float("nan"))
                    extra = f"no-grad forwards {fwd:.1f} s, epochs {opt_s:.1f} s, loss {stats['ppo/loss/total']:.4f}"
                (firsts if run == 0 else times).append(dt)
                print(f"{kind} {part} run {run}: {dt:.1f} s ({extra})", flush=True)
            results[kind, part] = statistics.median(times)
            rows.append([kind, part, f"{firsts[0]:.1f}", f"{results[kind, part]:.1f}",
                         ", ".join(f"{t:.1f}" for t in times)])
    return rows, results


if __name__ == "__main__":
    main()
