"""``ntk-kernels`` (also ``python -m ntk_kernels``): the package's command line.

    ntk-kernels info [--json]                 what was compiled, which backend runs each op on each device, versions
    ntk-kernels bench [--quick|--full] [--only NAME ...] [--json PATH] [--plot PNG] [--device D] [--dtype T]
                                              the microbenchmark suite (ntk_kernels.bench): every op against what
                                              a user would otherwise run, as a table of medians and ratios
    ntk-kernels ntk ...                       compute an empirical NTK (ntk_kernels._cli_ntk, where present)

``main(argv)`` returns the exit status: 0 on success, 1 when a bench failed, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

PROG = "ntk-kernels"


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="compiled extensions, the backend of each op per device, versions",
                       description="Print ntk_kernels.build_info(): versions, compiled extensions (loaded or why "
                                   "not), the backend each op uses on each device and why the others cannot run.")
    p.add_argument("--json", action="store_true", help="print build_info() as JSON instead")
    p.set_defaults(func=run_info, _parser=p)


def format_info(info: Dict[str, Any]) -> str:
    lines = [f"ntk_kernels {info['ntk_kernels']}",
             f"  python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}), "
             f"triton {info['triton']}",
             f"  devices: cpu" + "".join(f", cuda:{i} {name}" for i, name in enumerate(info["devices"]))
             + ("" if info["cuda_available"] else "  (no CUDA device visible)"),
             f"  TRITON_INTERPRET: {'on' if info['triton_interpret'] else 'off'}"]
    forced = {k: v for k, v in os.environ.items() if k.startswith("NTK_KERNELS_BACKEND") and v}
    if forced:
        lines.append("  forced backends: " + ", ".join(f"{k}={v}" for k, v in sorted(forced.items())))
    lines.append("compiled extensions:")
    for name, st in info["extensions"].items():
        what = f"loaded from {st.get('path')}" if st.get("loaded") == "yes" else f"not loaded: {st.get('why')}"
        lines.append(f"  {name:<8} {what}")
    lines.append("backends (op / device: the backend that runs it; why each other backend does not):")
    reasons = info.get("not_supported_reasons", {})
    for op, per_dev in info["backends"].items():
        lines.append(f"  {op}")
        for dev, chosen in per_dev.items():
            lines.append(f"    {dev:<5} -> {chosen}")
            for backend, why in reasons.get(op, {}).get(dev, {}).items():
                if backend != chosen:
                    lines.append(f"             {backend}: {'; '.join(why) if why else 'can run (lower preference)'}")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    from ._build_info import build_info

    info = build_info()
    print(json.dumps(info, indent=1, default=str) if args.json else format_info(info))
    return 0


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    from . import bench

    names = ", ".join(f"{b.name} ({b.summary})" for b in bench.BENCHES.values())
    p = sub.add_parser("bench", help="microbenchmarks: every op against its usual alternative",
                       description="Time every public op against what a user would otherwise run, on the device "
                                   "present, and print medians, ratios (baseline/ours), FLOP/s and peak memory. "
                                   f"Benches: {names}.",
                       epilog="How times and memory are measured: see the docstring of ntk_kernels.bench.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="small shapes, about a minute on a 2-core CPU (the default)")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="larger shapes (minutes)")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                      help="the smallest shapes and few rounds: seconds; checks that the suite runs (tests)")
    p.set_defaults(size="quick")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this bench (repeat, or comma-separate, for several); see --list")
    p.add_argument("--list", action="store_true", help="list the benches and exit")
    p.add_argument("--json", metavar="PATH", help="write results with machine, versions, shapes and git commit")
    p.add_argument("--plot", metavar="PNG", help="bar chart of the ratios (needs matplotlib)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), default="fp32",
                   help="dtype of the op benches (the eNTK benches always run float32 models); default fp32")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's; on a shared, oversubscribed machine 1 gives steadier "
                        "ratios)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run_bench, _parser=p)


def _bench_names(only: Optional[List[str]], parser: argparse.ArgumentParser) -> List[str]:
    from . import bench

    if not only:
        return list(bench.BENCHES)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in bench.BENCHES]
    if unknown:
        parser.error(f"--only: unknown bench {', '.join(map(repr, unknown))}; choose from "
                     f"{', '.join(bench.BENCHES)}")
    return list(dict.fromkeys(names))


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench

    parser = args._parser
    if args.list:
        for b in bench.BENCHES.values():
            print(f"{b.name:<16} {b.summary}")
        return 0
    names = _bench_names(args.only, parser)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib); "
                     "run without --plot or install it")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__})")
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{flag}: the folder of {path!r} does not exist")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    ctx = bench.Context(device=device, dtype=bench.DTYPES[args.dtype], size=args.size, log=log)
    rows = bench.run_suite(names, ctx)
    data = bench.report(rows, ctx)
    m, v = data["machine"], data["versions"]
    print(f"# ntk_kernels {v['ntk_kernels']} bench ({args.size}), {device} {args.dtype}: "
          f"{m.get('gpu', m['cpu'])}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {v['torch']}, "
          f"triton {v['triton']}, python {v['python']}; commit {data['commit']}{'+dirty' if data['dirty'] else ''}")
    print(f"# time: {data['timing']}; baseline/ours > 1: ntk_kernels faster; peak: {data['peak_memory']}")
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(args.json, data)
        log(f"wrote {args.json}")
    if args.plot:
        bench.plot(rows, args.plot, f"ntk_kernels {v['ntk_kernels']} on {m.get('gpu', m['cpu'])} ({device}), "
                                    f"commit {data['commit'][:12]}")
        log(f"wrote {args.plot}")
    return 1 if any(r["role"] == "error" for r in rows) else 0


# ----------------------------------------------------------------------------------------------
# ntk (ntk_kernels._cli_ntk, imported only when asked for)
# ----------------------------------------------------------------------------------------------
def _add_ntk(sub, load: bool) -> None:
    if not load:  # not on the command line: keep `info` and `bench` independent of _cli_ntk
        sub.add_parser("ntk", help="compute an empirical NTK (see: ntk-kernels ntk --help)")
        return
    try:
        mod = importlib.import_module("ntk_kernels._cli_ntk")
        add_arguments, run = mod.add_arguments, mod.run
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "ntk_kernels._cli_ntk":
            reason = "this installation of ntk_kernels has no ntk_kernels._cli_ntk"
        else:
            reason = f"ntk_kernels._cli_ntk did not load ({type(e).__name__}: {e})"
        p = sub.add_parser("ntk", help=f"unavailable: {reason}", description=f"unavailable: {reason}")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=lambda args: _unavailable("ntk", reason))
        return
    doc = (mod.__doc__ or "compute an empirical NTK").strip().splitlines()[0]
    p = sub.add_parser("ntk", help=doc, description=mod.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def _unavailable(cmd: str, reason: str) -> int:
    print(f"{PROG} {cmd}: unavailable: {reason}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------
def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="ntk_kernels: compiled kernels for the empirical NTK "
                                     "and LinChain / LoRA adapters in PyTorch.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,ntk}", required=True)
    _add_info(sub)
    _add_bench(sub)
    args = list(argv)
    _add_ntk(sub, load="ntk" in args or "-h" in args or "--help" in args)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: parse ``argv`` (default sys.argv[1:]), run the subcommand, return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:  # name the subcommand whose usage was broken, with its own usage line
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.func(args) or 0)
    except SystemExit as e:  # argparse: usage errors (2), --help / --version (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
