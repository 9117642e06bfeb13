"""
The statistics of the RLHF chain's reports: bootstrap confidence intervals (of a mean and of a paired difference),
Spearman's rank correlation, the pairwise accuracy of a scorer on preference pairs, and pass@k. Plain Python, seeded.
"""
import math
import random


def bootstrap_ci(values, n_boot=2000, seed=0, alpha=0.05):
    """Mean and percentile-bootstrap (1 - alpha) interval."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return sum(values) / n, means[int(alpha / 2 * n_boot)], means[int((1 - alpha / 2) * n_boot) - 1]


def paired_diff_ci(a, b, n_boot=2000, seed=0):
    """Mean of a - b over paired items (the same prompts), with a percentile-bootstrap 95% interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in size: {len(a)} vs {len(b)}")
    return bootstrap_ci([x - y for x, y in zip(a, b)], n_boot, seed)


def spearman(x, y):
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else 0.0


def pair_accuracy(pairs, score):
    """Fraction of (chosen, rejected) pairs the score orders like gold (a tie counts half)."""
    return sum(1.0 if score[c] > score[r] else 0.5 if score[c] == score[r] else 0.0
               for c, r in pairs) / max(1, len(pairs))


def pass_at_k(n, c, k):
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
