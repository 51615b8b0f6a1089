"""The shared benchmark harness: medians after warm-up, peak memory, ratios, a table, JSON with provenance, and the
pieces several scripts share (the gpu_check_* command line, forced backends, Triton compile info, the
subprocess workers' resident-set measurement and log, the sentence-classifier head).

Timing: ``triton.testing.do_bench`` on a GPU (CUDA events, L2 flushed), ``torch.utils.benchmark.Timer``
(``blocked_autorange``, median) on the CPU.  Peak memory: ``ntk_kernels.bench.peak_memory_bytes`` (imported when
first called, so that a baseline-only process does not load ntk_kernels): ``torch.cuda.max_memory_allocated`` on a
GPU; on the CPU, the process's peak resident set during the call (VmHWM after resetting it through
/proc/self/clear_refs) minus the resident set before it, with glibc told (mallopt) to serve every block of 64 KiB
or more by mmap during the call and the free heap pages returned first (malloc_trim): RSS then follows the live
tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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
    """The q-quantile, linearly interpolated (an even count's median is the mean of the two middle values)."""
    v = sorted(values)
    if not v:
        raise ValueError("quantile of no values")
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, VmSize); 0 when it is absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak memory a call uses beyond what was live before it (None where it cannot be measured):
    ``ntk_kernels.bench.peak_memory_bytes`` with the device given by name."""
    from ntk_kernels.bench import peak_memory_bytes as peak

    return peak(fn, torch.device(device))


def timed_rss_growth(fn: Callable[[], object]):
    """(seconds, peak bytes, result) of one call: the growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) over its resident set before the call, with glibc's default malloc after malloc_trim (the
    free heap pages returned first).  Unlike peak_memory_bytes, malloc is left as it is, so that the same call is
    also the timed one (forcing every block of 64 KiB or more through mmap costs page faults); freed memory that
    glibc keeps counts, as it does for the machine."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:  # VmHWM not reset: the growth below is then an upper bound
        pass
    base = status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    t = time.perf_counter() - t0
    return t, max(0, status_kib("VmHWM") - base) * 1024, out


def time_against_first(fns: Dict[str, Callable[[], object]], device: str, rounds: Optional[int], budget_s: float,
                       memory: bool = True) -> Dict[str, Dict[str, object]]:
    """name -> {seconds (median), ratio (median over rounds of t_name / t_first: > 1 is slower than the first),
    ratio_iqr ("q25-q75" of those ratios), rounds, peak_mib (None without ``memory`` or where unmeasurable)} of
    ``fns`` timed in turn (interleaved_seconds), then each one's peak memory."""
    names = list(fns)
    times = interleaved_seconds([fns[n] for n in names], device, rounds, budget_s)
    out = {}
    for k, name in enumerate(names):
        ratio = [a / b for a, b in zip(times[k], times[0])]
        peak = peak_memory_bytes(fns[name], device) if memory else None
        out[name] = {"seconds": quantile(times[k], 0.5), "ratio": quantile(ratio, 0.5),
                     "ratio_iqr": f"{quantile(ratio, 0.25):.2f}-{quantile(ratio, 0.75):.2f}", "rounds": len(times[k]),
                     "peak_mib": None if peak is None else peak / 2**20}
    return out


def median_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 3) -> float:
    """Median of ``reps`` timed calls after ``warmup``; CUDA events on a GPU, perf_counter on the CPU.  A call over a
    second cuts the repetitions to 3."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for r in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if r >= 2 and times[0] > 1000:
            break
    return statistics.median(times)


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """--sst2 (the SST-2 folder, default shared/data/sst2 beside the checkout) and the hidden --_worker (the
    JSON spec a script passes to the subprocess that runs one measurement)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--sst2", default=os.path.join(os.path.dirname(root), "shared", "data", "sst2"),
                    help="folder with SST-2's validation.tsv")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------
# Backends (the gpu_check_* scripts)
# ----------------------------------------------------------------------------------------------
def force_backend(op: str, backend: Optional[str]) -> None:
    """Forces ``backend`` for ``op`` through NTK_KERNELS_BACKEND_<OP> (read on every call); None lifts it."""
    key = f"NTK_KERNELS_BACKEND_{op.upper()}"
    if backend is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = backend


def format_reasons(reasons: Dict[str, List[str]]) -> str:
    """'backend: ok; backend: why, why' of a {backend: reasons} dict (empty reasons: it runs)."""
    return "; ".join(f"{b}: {'ok' if not r else ', '.join(r)}" for b, r in reasons.items())


def triton_compile_info(kernels) -> List[str]:
    """'kernel dev d: regs, spills, shared, warps' of every compiled variant of the Triton ``kernels`` (best effort:
    triton internals)."""
    lines = []
    for kern in kernels:
        try:
            for device, cache in kern.device_caches.items():
                for key, ck in cache[0].items():
                    lines.append(f"{kern.__name__} dev {device}: regs {getattr(ck, 'n_regs', '?')}, spills "
                                 f"{getattr(ck, 'n_spills', '?')}, shared {getattr(ck.metadata, 'shared', '?')}, "
                                 f"warps {getattr(ck.metadata, 'num_warps', '?')}")
        except Exception as e:  # interpreted, or internals moved
            lines.append(f"{getattr(kern, '__name__', kern)}: no compile info ({type(e).__name__})")
    return lines


def gpu_check_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every gpu_check_* script shares (the caller may add to it); parse with gpu_check_args."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bf16,fp32", help="timing dtypes, comma-separated (fp32, bf16, fp16)")
    ap.add_argument("--check-dtypes", default="fp64,fp32,bf16,fp16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    return ap


def gpu_check_args(ap: argparse.ArgumentParser, argv, script: str, dtypes: Dict[str, torch.dtype],
                   smoke_help: str = "tiny shapes, 3 repetitions"):
    """(args, timing dtypes, check dtypes) of a gpu_check_* command line, after adding --device / --smoke and
    exiting with a message on a missing GPU, --device cpu without --smoke, or an unknown dtype name."""
    ap.add_argument("--device", default="cuda", help="cpu only with --smoke (the script's logic on tiny shapes)")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA device (or --smoke --device cpu)")
    if args.device == "cpu" and not args.smoke:
        sys.exit("--device cpu runs only with --smoke")
    timing = [d for d in args.dtypes.split(",") if d]
    check = [d for d in args.check_dtypes.split(",") if d]
    for d in timing + check:
        if d not in dtypes:
            sys.exit(f"unknown dtype {d!r}: one of {list(dtypes)}")
    return args, timing, check


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class MeanPoolHead(torch.nn.Module):
    """Sentence encoder -> masked mean of the last hidden state -> nn.Linear(d, n_out)."""

    def __init__(self, encoder, d, n_out=2):
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(0)
        self.head = torch.nn.Linear(d, n_out)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def logits(out):
    """A model output's logits (a tensor, or a transformers output's .logits)."""
    return out if isinstance(out, torch.Tensor) else out.logits


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
