"""The shared benchmark harness: medians after warm-up, peak memory, ratios, a table, JSON with provenance.

Timing: ``triton.testing.do_bench`` on a GPU (CUDA events, L2 flushed), ``torch.utils.benchmark.Timer``
(``blocked_autorange``, median) on the CPU.  Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU;
on the CPU, the process's peak resident set during the call (VmHWM after resetting it through
/proc/self/clear_refs) minus the resident set before it.  torch's CPU allocator does not cache, but glibc
keeps freed heap memory resident, so during that measurement glibc is told (mallopt) to serve every block
of 64 KiB or more by mmap, returned at free, and malloc_trim returns the free heap pages before the call:
RSS then follows the live tensors.  Afterwards the threshold is
set to 32 MiB, glibc's own ceiling for its dynamic threshold.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, min_run_time: float = 1.0) -> float:
    if device.startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    import torch.utils.benchmark as tb

    fn()  # warm-up (first-call allocations, lazy init)
    return tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def interleaved_seconds(fns: List[Callable[[], object]], device: str, rounds: Optional[int] = None,
                        budget_s: float = 20.0) -> List[List[float]]:
    """Per-call times of ``fns`` run in turn, one call each per round (f0, f1, f2, f0, f1, ...), after one warm-up
    round.  Interleaving at the granularity of single calls makes slow drift of a shared machine cancel in the
    per-round ratios.  ``rounds`` None: as many rounds as fit in ``budget_s`` (5 to 40)."""
    t0 = time.perf_counter()
    for fn in fns:  # warm-up
        fn()
    sync(device)
    if rounds is None:
        per_round = max(time.perf_counter() - t0, 1e-6)
        rounds = int(min(40, max(5, budget_s / per_round)))
    out: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            sync(device)
            s = time.perf_counter()
            fn()
            sync(device)
            out[i].append(time.perf_counter() - s)
    return out


def quantile(values: List[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak memory a call uses beyond what was live before it (None where it cannot be measured)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import ctypes
    import gc

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    try:
        gc.collect()
        libc.malloc_trim(0)  # free heap pages go back to the OS, so reusing them shows up in RSS again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        fn()
        return max(0, (_rss_kib("VmHWM") - base) * 1024)
    except OSError:
        return None
    finally:
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)


def machine() -> Dict[str, object]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        info["commit"] += "+dirty" if dirty else ""
    except OSError:
        info["commit"] = "unknown"
    return info


def table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns``."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def write_json(path: str, rows: List[Dict[str, object]], extra: Optional[Dict[str, object]] = None) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine(), **(extra or {}), "results": rows}, f, indent=1)
