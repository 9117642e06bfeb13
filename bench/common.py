"""Helpers shared by the benchmarks: the hardware line, medians of repeated runs, and the table."""
import os
import platform
import statistics
import sys
import time

import torch


def hardware():
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    kernels = sys.modules.get("cpu_kernels")  # imported with the model: whether this process keeps freed memory
    malloc = "" if kernels is None else "; malloc: " + (
        "freed memory kept" if kernels.KEEPS_FREED_MEMORY else "the system's as it comes")
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}{malloc}")


def median_rate(fn, work, runs=3, warmup=1):
    """Median over `runs` of work / seconds for fn(); `warmup` untimed calls first."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        rates.append(work / (time.perf_counter() - t0))
    return statistics.median(rates)


def print_table(title, header, rows):
    print(f"\n{title}\nhardware: {hardware()}\ncommand: python {' '.join(sys.argv)}\n")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
