"""The ``ntk-kernels`` command line (ntk_kernels.cli, ntk_kernels.bench): info, bench, ntk, usage errors.

Bench runs use ``--tiny`` (the smallest shapes, a few rounds): these tests check what the suite records, never how
fast anything is.  The module entry point (``python -m ntk_kernels``) runs in a subprocess; the rest in-process.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import ntk_kernels
from ntk_kernels import bench, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_module(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ntk_kernels", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


# ---------------------------------------------------------------------------------------------------- info
def test_module_info_prints_every_op_and_extension():
    p = _run_module("info")
    assert p.returncode == 0, p.stderr
    info = ntk_kernels.build_info()
    assert f"ntk_kernels {ntk_kernels.__version__}" in p.stdout
    assert f"torch {torch.__version__}" in p.stdout
    for ext in info["extensions"]:
        assert re.search(rf"^\s+{re.escape(ext)}\s+(loaded from|not loaded: )", p.stdout, re.M), p.stdout
    for op, per_dev in info["backends"].items():
        assert re.search(rf"^\s+{op}$", p.stdout, re.M), f"op {op} missing from:\n{p.stdout}"
        for dev, chosen in per_dev.items():
            assert re.search(rf"^\s+{dev}\s+-> {re.escape(chosen)}$", p.stdout, re.M), p.stdout


def test_info_json_is_build_info(capsys):
    assert cli.main(["info", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = json.loads(json.dumps(ntk_kernels.build_info(), default=str))
    assert got == want
    assert set(got) >= {"ntk_kernels", "torch", "triton", "python", "extensions", "backends", "devices"}


# ---------------------------------------------------------------------------------------------------- bench
def _check_report(data, names, size="tiny"):
    assert data["schema"] == "ntk_kernels.bench/1"
    assert data["size"] == size and data["device"] == "cpu" and data["dtype"] == "float32"
    m = data["machine"]
    assert isinstance(m["cpu"], str) and m["cpu"] and m["cores"] == os.cpu_count()
    assert m["torch_threads"] >= 1
    v = data["versions"]
    assert v["torch"] == torch.__version__ and v["ntk_kernels"] == ntk_kernels.__version__
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "triton" in v
    assert isinstance(data["commit"], str)
    assert data["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", data["commit"]), data["commit"]
    rows = data["results"]
    assert {r["bench"] for r in rows} == set(names)
    for name in names:
        mine = [r for r in rows if r["bench"] == name]
        assert not [r for r in mine if r["role"] == "error"], mine
        cases = bench.BENCHES[name].cases[size]
        assert [r["shapes"] for r in mine if r["role"] == "ours"] == [json.loads(json.dumps(c)) for c in cases]
        for case in cases:
            got = [r for r in mine if r["shapes"] == json.loads(json.dumps(case))]
            roles = [r["role"] for r in got]
            assert roles[0] == "ours" and roles.count("ours") == 1 and roles.count("baseline") >= 1, roles
            for r in got:
                assert r["median_ms"] > 0 and r["q25_ms"] <= r["median_ms"] <= r["q75_ms"]
                assert r["peak_mib"] is None or r["peak_mib"] >= 0
                assert r["gflops"] is None or r["gflops"] > 0
                if r["role"] == "baseline":
                    assert r["speedup"] > 0 and r["speedup"] == pytest.approx(r["speedup"])  # finite, positive
                else:
                    assert r["speedup"] is None
            ours = got[0]
            if "max_rel_err_vs_baseline" in ours:  # the two implementations computed the same thing
                assert ours["max_rel_err_vs_baseline"] < 1e-4, ours


def test_module_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    p = _run_module("bench", "--tiny", "--only", "linear_jvp", "--json", str(out))
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    _check_report(data, ["linear_jvp"])
    assert "| linear_jvp" in p.stdout and "baseline/ours" in p.stdout  # the table
    row = data["results"][0]
    assert row["shapes"] == {"N": 2, "L": 3, "d_in": 8, "d_out": 8}
    n, l, di, do = 2, 3, 8, 8
    assert row["gflops"] == pytest.approx(3 * 2.0 * n * l * di * do / (row["median_ms"] / 1e3) / 1e9)


def test_bench_in_process_several_and_commit(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--tiny", "--only", "gram,layer_norm_jvp", "--only", "gram", "--json", str(out),
                     "--quiet"]) == 0
    data = json.loads(out.read_text())
    _check_report(data, ["gram", "layer_norm_jvp"])
    assert capsys.readouterr().err == ""  # --quiet
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert data["commit"] == git.stdout.strip()
        assert isinstance(data["dirty"], bool)


def test_git_commit_unknown_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "ntk_kernels" / "bench.py"))
    (tmp_path / "ntk_kernels").mkdir()
    assert bench.git_commit() == {"commit": "unknown", "dirty": None}


def test_bench_list(capsys):
    assert cli.main(["bench", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(bench.BENCHES)


def test_bench_failures_are_reported_and_exit_1(monkeypatch, tmp_path, capsys):
    def boom(case, ctx):
        raise ValueError("kaputt")

    def skip(case, ctx):
        raise bench.Skip("not here")

    monkeypatch.setattr(bench, "BENCHES", {"boom": bench.Bench("boom", "fails", {"tiny": [{"a": 1}]}, boom),
                                           "skip": bench.Bench("skip", "skips", {"tiny": [{"b": 2}]}, skip)})
    out = tmp_path / "f.json"
    assert cli.main(["bench", "--tiny", "--json", str(out)]) == 1
    text = capsys.readouterr()
    assert "error: ValueError: kaputt" in text.out and "skipped: not here" in text.out
    rows = json.loads(out.read_text())["results"]
    assert [(r["bench"], r["role"]) for r in rows] == [("boom", "error"), ("skip", "skipped")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is read from /proc")
def test_peak_memory_sees_a_64mib_allocation():
    mib = 2 ** 20

    def alloc():
        t = torch.ones(64 * mib // 4)  # 64 MiB, written
        return float(t[-1])

    peak = bench.peak_memory_bytes(alloc, torch.device("cpu"))
    assert peak is not None and 60 * mib <= peak <= 80 * mib, peak
    assert bench.peak_memory_bytes(lambda: None, torch.device("cpu")) < 8 * mib


@pytest.mark.parametrize("n", [1, 2, 4, 7, 10])
def test_bench_quantile_is_interpolated(n):
    """Medians and quartiles interpolate between order statistics (an even count's median is the mean of the two
    middle values), checked against the statistics module (its 'inclusive' method is numpy's linear one)."""
    import statistics

    g = torch.Generator().manual_seed(n)
    vals = (torch.rand(n, generator=g, dtype=torch.float64) * 10 + 1).tolist()
    if n == 1:
        assert bench._quantile(vals, 0.5) == pytest.approx(vals[0])
        return
    q25, q50, q75 = statistics.quantiles(vals, n=4, method="inclusive")
    assert bench._quantile(vals, 0.5) == pytest.approx(statistics.median(vals), rel=1e-12)
    assert bench._quantile(vals, 0.5) == pytest.approx(q50, rel=1e-12)
    assert bench._quantile(vals, 0.25) == pytest.approx(q25, rel=1e-12)
    assert bench._quantile(vals, 0.75) == pytest.approx(q75, rel=1e-12)
    if n == 2:  # the mean of the two, not the larger
        assert bench._quantile([1.0, 3.0], 0.5) == 2.0


def test_plot(tmp_path, capsys):
    png = tmp_path / "r.png"
    args = ["bench", "--tiny", "--only", "linear_jvp", "--plot", str(png), "--quiet"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "--plot needs matplotlib" in err and "pip install matplotlib" in err
        assert not png.exists()
        return
    assert cli.main(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- ntk
def test_ntk_subcommand_registered_or_unavailable(capsys):
    try:
        import ntk_kernels._cli_ntk  # noqa: F401
    except ModuleNotFoundError:
        assert cli.main(["ntk"]) == 2
        assert "unavailable" in capsys.readouterr().err
        return
    assert cli.main(["ntk", "--help"]) == 0
    assert "usage: ntk-kernels ntk" in capsys.readouterr().out


def test_ntk_subcommand_missing_module_says_unavailable(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ntk_kernels._cli_ntk", None)  # import raises ModuleNotFoundError
    assert cli.main(["ntk", "whatever.txt"]) == 2
    err = capsys.readouterr().err
    assert "ntk-kernels ntk: unavailable" in err and "ntk_kernels._cli_ntk" in err
    assert cli.main(["info", "--json"]) == 0  # the others do not depend on it


# ---------------------------------------------------------------------------------------------------- usage errors
def test_module_bad_subcommand_exits_2():
    p = _run_module("frobnicate")
    assert p.returncode == 2
    assert "invalid choice: 'frobnicate'" in p.stderr and "usage: ntk-kernels" in p.stderr


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required"),
    (["bench", "--bogus"], "ntk-kernels bench: error: unrecognized arguments: --bogus"),
    (["info", "--bogus"], "ntk-kernels info: error: unrecognized arguments: --bogus"),
    (["bench", "--only", "nope"], "--only: unknown bench 'nope'; choose from linchain"),
    (["bench", "--quick", "--full"], "not allowed with argument"),
    (["bench", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["bench", "--device", "tpu"], "--device must be cpu or cuda"),
    (["bench", "--json", "/nonexistent-dir/x.json"], "--json: the folder of '/nonexistent-dir/x.json' does not exist"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA device exists")
def test_bench_cuda_without_gpu_is_a_usage_error(capsys):
    assert cli.main(["bench", "--tiny", "--device", "cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_help_and_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ntk-kernels {ntk_kernels.__version__}"
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in bench.BENCHES:
        assert name in out


def test_ntk_subcommand_runs_through_this_cli(tmp_path, capsys):
    """The ``ntk`` subcommand as registered here (add_arguments + run) computes the eNTK of its model."""
    cli_ntk = pytest.importorskip("ntk_kernels._cli_ntk")
    np = pytest.importorskip("numpy")
    from ntk_kernels.ntk import empirical_ntk_reference

    x = np.random.default_rng(0).standard_normal((5, 3))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "K.npy"
    argv = ["ntk", str(tmp_path / "x.npy"), "--model", "mlp", "--num-outputs", "2", "--seed", "0", "--mode", "full",
            "--dtype", "float64", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    model = cli_ntk.build_model("mlp", 2, 0, 3)[0].double()
    want = empirical_ntk_reference(model, torch.from_numpy(x), mode="full", dtype=torch.float64)
    got = torch.from_numpy(np.load(out))
    assert got.shape == (5, 5, 2, 2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
