"""
The base model's corpus for the reasoning study: documents of the arithmetic task (tasks/arithmetic.py) — worked
solutions in R1-Zero's template, some with a slip, some answers without working, some with a broken format — as
JSON shards in TinyStories' layout, so the project's own pipeline takes them from there:

    python -m rlhf.arithmetic_corpus --out_dir=data/arithmetic --n_docs=200000
    python tinystories.py train_vocab --vocab_size=320 --data_dir=data/arithmetic
    python tinystories.py pretokenize --vocab_size=320 --data_dir=data/arithmetic
    python train.py config/reason_base_cpu.py

Shard 0 is the validation split, as for TinyStories. No held-out or out-of-distribution problem of the task occurs
in any document. Writes out_dir/data00.json ... (atomically) and out_dir/corpus.jsonl (the settings and the counts
of each kind).
"""
import json
import os
import sys
from collections import Counter

import configurator
from tasks.arithmetic import MIX, corpus_documents
from utils import atomic_write

# -----------------------------------------------------------------------------
out_dir = "data/arithmetic"
n_docs = 200_000
n_shards = 5  # shard 0: validation
seed = 0
worked = MIX["worked"]  # the share of each kind of document (normalised)
slip = MIX["slip"]
direct = MIX["direct"]
broken = MIX["broken"]
# -----------------------------------------------------------------------------
config = configurator.configure(globals(), sys.argv[1:], positive=("n_docs", "n_shards"))


def main():
    mix = {"worked": worked, "slip": slip, "direct": direct, "broken": broken}
    if min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise SystemExit(f"error: the mix must be >= 0 with a positive sum, got {mix}")
    kinds_docs = corpus_documents(n_docs, seed, mix)
    docs = [d for _, d in kinds_docs]
    os.makedirs(out_dir, exist_ok=True)
    per = -(-len(docs) // n_shards)
    for i in range(n_shards):
        with atomic_write(os.path.join(out_dir, f"data{i:02d}.json"), "w") as f:
            json.dump([{"story": d} for d in docs[i * per:(i + 1) * per]], f)
    kinds = Counter(k for k, _ in kinds_docs)
    with atomic_write(os.path.join(out_dir, "corpus.jsonl"), "w") as f:  # not *.json: that is a shard
        f.write(json.dumps({"config": config, "documents": len(docs), "kinds": kinds}) + "\n")
    print(f"{len(docs):,} documents ({dict(kinds)}) in {n_shards} shards in {out_dir}; for example:\n"
          + "\n".join(docs[:3]))


if __name__ == "__main__":
    main()
