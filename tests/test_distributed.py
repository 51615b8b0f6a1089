"""ntk_kernels.distributed.empirical_ntk on 2 CPU processes (gloo, torchrun) against the single-process engine.

One torchrun launch runs ``worker`` (this file as a script) on 2 ranks: an MLP and a tiny BERT in float64, N not
divisible by the tile size, symmetric (inputs2=None) and rectangular, K gathered on rank 0 and written into one
.npy memmap, the ``distributed=True`` switch of empirical_ntk, a resumable workdir, and the collective argument
checks (ranks given different inputs; a bad argument on one rank only).  Rank 0 saves what it got and the
single-process results; the tests below compare them:
  - to ``compute_ntk_tiled`` with the same tiles in one process: torch.equal (the same engine calls);
  - to ``empirical_ntk`` on the whole problem: max error <= 1e-12 * max(1, max |K|) (other blocks, other rounding).
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- models, data
def mlp():
    torch.manual_seed(0)
    layers = [nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 8, bias=False), nn.GELU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double().eval()


def tiny_bert():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                  vocab_size=40, max_position_embeddings=16, num_labels=2, attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg).double().eval()


def text(n, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        mask[i, t - i % 3:] = 0  # padded tails of 0, 1 or 2 positions
    return {"input_ids": ids * mask, "attention_mask": mask}


def floats(n, seed):
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=F64)


# (name, model, inputs1, inputs2, engine kwargs, tile size): N = 11 / 7 with tiles of 3 or 4
def cases():
    m, b = mlp(), tiny_bert()
    return [
        ("mlp_sym_full", m, floats(11, 0), None, dict(mode="full"), 3),
        ("mlp_rect_trace", m, floats(11, 0), floats(7, 1), dict(mode="trace"), 4),
        ("mlp_sym_diag", m, floats(11, 0), None, dict(mode="diagonal"), 4),
        ("mlp_asym_sign", m, floats(7, 0), None, dict(mode="trace", kernel="asymmetric_signgd"), 3),
        ("bert_sym_full", b, text(7), None, dict(mode="full"), 3),
        ("bert_rect_full", b, text(7), text(5, seed=1), dict(mode="full", params=r"encoder|classifier"), 3),
    ]


# ---------------------------------------------------------------------------------------------- the worker
def worker(outdir):
    """Run on every rank by torchrun; rank 0 saves results.pt (and errors.json)."""
    import torch.distributed as dist

    from ntk_kernels import empirical_ntk
    from ntk_kernels import distributed as dntk
    from ntk_kernels._tiles import compute_ntk_tiled

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    res, errors = {}, {}
    for name, model, x1, x2, kw, ts in cases():
        kw = dict(kw, dtype=F64)
        gathered = dntk.empirical_ntk(model, x1, x2, tile_size=ts, **kw)
        path = os.path.join(outdir, f"{name}.npy")
        mm = dntk.empirical_ntk(model, x1, x2, tile_size=ts, out=path, **kw)
        if rank == 0:
            res[name] = {"gathered": gathered, "memmap": torch.from_numpy(mm.copy()),
                         "tiled": compute_ntk_tiled(model, x1, x2, workdir=None, tile_size=ts, **kw),
                         "whole": empirical_ntk(model, x1, x2, **kw)}
        else:
            assert gathered is None and mm is None
    # the empirical_ntk(distributed=True) switch, default tile size
    m, x = mlp(), floats(9, 3)
    k = empirical_ntk(m, x, mode="full", dtype=F64, distributed=True)
    if rank == 0:
        res["switch"] = {"gathered": k, "whole": empirical_ntk(m, x, mode="full", dtype=F64)}
    # a subgroup (send / recv address global ranks) and bfloat16 (sent bit for bit as int16)
    sub = dist.new_group([0, 1])
    k = dntk.empirical_ntk(m, x, tile_size=4, group=sub, mode="diagonal", dtype=F64)
    mb, xb = mlp().to(torch.bfloat16), x[:5].to(torch.bfloat16)
    kb = dntk.empirical_ntk(mb, xb, tile_size=2, mode="trace", dtype=torch.bfloat16)
    if rank == 0:
        res["subgroup"] = {"gathered": k, "tiled": compute_ntk_tiled(m, x, workdir=None, tile_size=4, mode="diagonal",
                                                                     dtype=F64)}
        res["bf16"] = {"gathered": kb, "tiled": compute_ntk_tiled(mb, xb, workdir=None, tile_size=2, mode="trace",
                                                                  dtype=torch.bfloat16)}
    # a resumable workdir: first run writes the tiles, the second loads them (same values), tiles from both ranks
    wd = os.path.join(outdir, "wd")
    k1 = dntk.empirical_ntk(m, x, tile_size=2, workdir=wd, mode="trace", dtype=F64)
    k2 = dntk.empirical_ntk(m, x, tile_size=2, workdir=wd, mode="trace", dtype=F64)
    if rank == 0:
        res["workdir"] = {"first": k1, "second": k2, "whole": empirical_ntk(m, x, mode="trace", dtype=F64),
                          "files": sorted(f for f in os.listdir(wd) if f.startswith("tile_"))}
    # a different job in the same workdir is refused on every rank
    try:
        dntk.empirical_ntk(m, floats(9, 4), tile_size=2, workdir=wd, mode="trace", dtype=F64)
    except (ValueError, RuntimeError) as e:
        errors["workdir_mismatch"] = f"{'ValueError' if isinstance(e, ValueError) else type(e).__name__}: {e}"
    # ranks given different inputs: every rank raises (none waits forever)
    try:
        dntk.empirical_ntk(m, floats(9, rank), tile_size=3, dtype=F64)
    except ValueError as e:
        errors["inputs_differ"] = str(e)
    # a bad argument on rank 1 only: rank 1 raises its own error, rank 0 a RuntimeError naming rank 1
    try:
        dntk.empirical_ntk(m, x, tile_size=0 if rank == 1 else 3, dtype=F64)
    except (ValueError, RuntimeError) as e:
        errors["one_rank_bad"] = f"{type(e).__name__}: {e}"
    # a rank failing while computing its tiles for out=*.npy: every rank raises, no K.npy and no partial file
    import ntk_kernels._tiles as tiles_mod
    real_compute = tiles_mod.compute_tile

    def failing_compute(*a, **k):
        raise RuntimeError("tile boom")

    if rank == 1:
        tiles_mod.compute_tile = failing_compute
    failed_out = os.path.join(outdir, "failed.npy")
    try:
        dntk.empirical_ntk(m, x, tile_size=3, out=failed_out, dtype=F64)
    except RuntimeError as e:
        errors["out_fails"] = str(e)
    finally:
        tiles_mod.compute_tile = real_compute
    dist.barrier()  # rank 0 has removed the partial file
    errors["out_left"] = sorted(f for f in os.listdir(outdir) if "failed" in f)
    # a rank failing to build its message for rank 0 (after the tiles): every rank raises, none waits in recv
    real_wire = dntk._wire

    def failing_wire(t):
        raise RuntimeError("wire boom")

    if rank == 1:
        dntk._wire = failing_wire
    try:
        dntk.empirical_ntk(m, x, tile_size=3, dtype=F64)
    except RuntimeError as e:
        errors["send_fails"] = str(e)
    finally:
        dntk._wire = real_wire
    all_errors = [None] * world
    dist.all_gather_object(all_errors, errors)
    if rank == 0:
        torch.save(res, os.path.join(outdir, "results.pt"))
        with open(os.path.join(outdir, "errors.json"), "w") as fh:
            json.dump(all_errors, fh)
    dist.barrier()
    # last, the ntk command under torchrun (it sees WORLD_SIZE = 2 and this process group, and destroys it at the end)
    from ntk_kernels._cli_ntk import main
    rc = main([os.path.join(outdir, "x.npy"), "--dtype", "float64", "--num-outputs", "3", "--tile-size", "3",
               "--device", "cpu", "--workdir", os.path.join(outdir, "cli_wd"), "--out", os.path.join(outdir, "cli.npy"),
               "--no-progress"])
    with open(os.path.join(outdir, f"cli_rc_{rank}"), "w") as fh:
        fh.write(f"{rc} {dist.is_initialized()}")  # the command took the distributed path: it destroyed the group
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the tests
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    pytest.importorskip("transformers")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    np.save(out / "x.npy", np.random.default_rng(0).standard_normal((10, 4)))  # for the ntk command
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.abspath(__file__), str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    res = torch.load(out / "results.pt", weights_only=False)
    with open(out / "errors.json") as fh:
        errors = json.load(fh)
    return res, errors, out


def close(a, b, name):
    assert a.shape == b.shape and a.dtype == b.dtype == F64, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= 1e-12 * scale, f"{name}: max error {err:.3e} > {1e-12 * scale:.3e}"


def symmetric(k, mode):
    return torch.equal(k, k.permute(1, 0, 3, 2) if mode == "full" else k.transpose(0, 1))


@pytest.mark.parametrize("name", [c for c in ("mlp_sym_full", "mlp_rect_trace", "mlp_sym_diag", "mlp_asym_sign",
                                              "bert_sym_full", "bert_rect_full")])
def test_two_ranks_match_single_process(launched, name):
    r = launched[0][name]
    mode = {"full": "full", "trace": "trace", "diag": "diagonal", "sign": "trace"}[name.split("_")[-1]]
    assert r["whole"].abs().max() > 0
    for how in ("gathered", "memmap"):
        assert torch.equal(r[how], r["tiled"]), f"{name} {how}: differs from the same tiles in one process"
        close(r[how], r["whole"], f"{name} {how}")
        if "_sym_" in name:
            assert symmetric(r[how], mode), f"{name} {how}: not exactly symmetric"
    if name == "mlp_asym_sign":  # inputs2=None but an asymmetric kernel: every tile computed, K not symmetric
        assert not symmetric(r["gathered"], mode)


def test_distributed_switch_of_empirical_ntk(launched):
    r = launched[0]["switch"]
    close(r["gathered"], r["whole"], "distributed=True")
    assert symmetric(r["gathered"], "full")


@pytest.mark.parametrize("name", ["subgroup", "bf16"])
def test_subgroup_and_bfloat16(launched, name):
    r = launched[0][name]
    assert r["gathered"].dtype == r["tiled"].dtype and r["tiled"].abs().max() > 0
    assert torch.equal(r["gathered"], r["tiled"])


def test_workdir_shared_by_ranks(launched):
    r = launched[0]["workdir"]
    assert torch.equal(r["first"], r["second"])
    close(r["first"], r["whole"], "workdir")
    assert len(r["files"]) == 15  # ceil(9 / 2) = 5 tile rows: 5 * 6 / 2 upper-triangle tiles, from both ranks


def test_collective_errors(launched):
    errors = launched[1]
    for rank in (0, 1):
        e = errors[rank]
        # rank 0 checks the manifest and raises TileStoreMismatch; rank 1 a RuntimeError quoting it
        assert "different job" in e["workdir_mismatch"] and "inputs_fingerprint" in e["workdir_mismatch"]
        assert e["workdir_mismatch"].startswith("ValueError" if rank == 0 else "RuntimeError")
        assert "rank(s) [1]" in e["inputs_differ"] and "other inputs" in e["inputs_differ"]
    assert errors[1]["one_rank_bad"].startswith("ValueError: tile_size must be a positive int")
    assert errors[0]["one_rank_bad"].startswith("RuntimeError") and "rank(s) [1]" in errors[0]["one_rank_bad"]


def test_failures_leave_no_result_and_no_rank_waiting(launched):
    """One rank failing while computing tiles for out=*.npy: both ranks raise, and neither K.npy nor the partial
    file is left; one rank failing to build its message for rank 0: both raise (rank 0 does not hang in recv)."""
    errors = launched[1]
    assert "tile boom" in errors[1]["out_fails"]
    assert "rank(s) [1]" in errors[0]["out_fails"] and "tile boom" in errors[0]["out_fails"]
    for rank in (0, 1):
        assert errors[rank]["out_left"] == [], errors[rank]["out_left"]
    assert "wire boom" in errors[1]["send_fails"]
    assert "rank(s) [1]" in errors[0]["send_fails"] and "wire boom" in errors[0]["send_fails"]


def test_memmap_results_are_renamed_into_place(launched):
    """out=*.npy: the result is written through a hidden partial file that is gone once the job is done."""
    out = launched[2]
    assert (out / "mlp_sym_full.npy").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".partial.npy")]


def test_comm_device_follows_the_inputs():
    """NCCL: the collectives' tensors go to the inputs' GPU (not the current device); gloo: the CPU."""
    from ntk_kernels.distributed import _comm_device

    class FakeDist:
        def __init__(self, backend):
            self.backend = backend

        def get_backend(self, group):
            return self.backend

    x = torch.empty(2, 3, device="meta")
    assert _comm_device(FakeDist("gloo"), None, x) == torch.device("cpu")
    if torch.cuda.is_available():
        last = torch.cuda.device_count() - 1
        xc = torch.zeros(2, 3, device=f"cuda:{last}")
        assert _comm_device(FakeDist("nccl"), None, xc) == torch.device("cuda", last)
        assert _comm_device(FakeDist("nccl"), None, {"a": xc}) == torch.device("cuda", last)


def test_ntk_command_under_torchrun(launched):
    """The command's K from 2 ranks; the tiles the ranks left in its workdir resume a single-process run, whose
    .npy is then byte-identical."""
    from ntk_kernels._cli_ntk import build_model, main

    out = launched[2]
    assert [(out / f"cli_rc_{r}").read_text() for r in (0, 1)] == ["0 False", "0 False"]
    K = torch.from_numpy(np.load(out / "cli.npy"))
    x = torch.from_numpy(np.load(out / "x.npy"))
    model = build_model("mlp", 3, 0, d_in=4)[0].double()
    from ntk_kernels import empirical_ntk
    close(K, empirical_ntk(model, x, dtype=F64), "ntk command")
    assert symmetric(K, "full")
    assert len([f for f in os.listdir(out / "cli_wd") if f.startswith("tile_")]) == 10  # 4 tile rows: 4 * 5 / 2
    assert main([str(out / "x.npy"), "--dtype", "float64", "--num-outputs", "3", "--tile-size", "3", "--device", "cpu",
                 "--workdir", str(out / "cli_wd"), "--out", str(out / "single.npy"), "--no-progress"]) == 0
    assert (out / "single.npy").read_bytes() == (out / "cli.npy").read_bytes()


def test_not_initialized_is_refused():
    from ntk_kernels import empirical_ntk
    from ntk_kernels import distributed as dntk

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    x = floats(4, 0)
    with pytest.raises(RuntimeError, match="not initialized.*torchrun"):
        dntk.empirical_ntk(mlp(), x, tile_size=2)
    with pytest.raises(RuntimeError, match="not initialized.*torchrun"):
        empirical_ntk(mlp(), x, distributed=True)


def test_tile_assignment_and_default_size():
    from ntk_kernels._tiles import tile_grid
    from ntk_kernels.distributed import assign_tiles, default_tile_size

    for n1, n2, sym, ts, world in ((11, 11, True, 3, 2), (11, 7, False, 4, 3), (5, 5, True, 2, 8), (1, 1, True, 1, 4)):
        tiles = tile_grid(n1, n2, ts, sym)
        owned = assign_tiles(tiles, world)
        flat = sorted(t for ts_ in owned for t in ts_)
        assert flat == sorted(tiles)  # every tile once
        covered = torch.zeros(n1, n2, dtype=torch.int64)
        for _, _, (r0, r1), (c0, c1) in tiles:
            covered[r0:r1, c0:c1] += 1
            if sym and (r0, r1) != (c0, c1):
                covered[c0:c1, r0:r1] += 1
        assert (covered == 1).all()  # with mirrors, every entry of K exactly once
        cost = [sum((t[2][1] - t[2][0]) * (t[3][1] - t[3][0]) + (t[2][1] - t[2][0]) + (t[3][1] - t[3][0])
                    for t in o) for o in owned]
        biggest = max((t[2][1] - t[2][0]) * (t[3][1] - t[3][0]) + (t[2][1] - t[2][0]) + (t[3][1] - t[3][0])
                      for t in tiles)
        assert max(cost) - min(cost) <= biggest  # greedy balance: loads within one tile of each other
    assert default_tile_size(100, 100, True, 1) == 100
    for world in (2, 3, 8):
        ts = default_tile_size(100, 100, True, world)
        assert len(tile_grid(100, 100, ts, True)) >= 2 * world
        rows = -(-100 // ts)
        assert rows == 1 or len(tile_grid(100, 100, -(-100 // (rows - 1)), True)) < 2 * world  # the largest such


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    worker(sys.argv[1])
