"""A resumable, tiled eNTK job: the Gram matrix K (N1, N2[, C[, C]]) cut into tiles, one file per finished tile.

    K[r0:r1, c0:c1] = empirical_ntk(model, inputs1[r0:r1], inputs2[c0:c1])        tile (ti, tj), rows r0 = ti·s ...

With inputs2=None (and a kernel other than "asymmetric_signgd") only the tiles tj >= ti are computed; a diagonal
tile is the engine's own symmetric call on inputs1[r0:r1] and K[c0:c1, r0:r1] is the mirror of tile (ti, tj), so
the result is exactly symmetric.

The store is a directory:

    manifest.json        N1, N2, C, mode, kernel, dtype, tile size, symmetric, and the sha256 fingerprints of the
                         model (its state_dict: names, dtypes, shapes, bytes; the names of the selected
                         parameters) and of the inputs, and output_fn's name and outputs on the first sample; a
                         resume whose fingerprints or settings differ is refused
    tile_r{ti}_c{tj}.pt  one finished tile (torch.save), written to a temporary file in the same directory,
                         fsync'ed, then os.replace'd into place: a job killed at any moment (SIGINT, SIGKILL)
                         leaves only complete tiles (and perhaps a ``.tmp`` file, removed on the next open)

``compute_ntk_tiled`` computes the missing tiles and assembles K (in memory, or into a .npy memmap for an N too
large for RAM); ``ntk_kernels.distributed.empirical_ntk(..., workdir=...)`` shares the same store among ranks.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
import warnings
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .ntk import empirical as _engine

MANIFEST = "manifest.json"
FORMAT = 1
# hidden test hook: seconds to sleep after each finished tile (makes a job slow enough to be killed mid-way)
_SLEEP_ENV = "NTK_KERNELS_TEST_TILE_SLEEP"
# engine arguments that change the kernel's values (a resume must match them); the rest only change rounding
_VALUE_ARGS = ("mode", "kernel", "dtype")
_ENGINE_ARGS = ("params", "mode", "kernel", "output_fn", "block_size", "memory_budget", "strategy", "dtype")

Tile = Tuple[int, int, Tuple[int, int], Tuple[int, int]]  # (ti, tj, (r0, r1), (c0, c1))


class TileStoreMismatch(ValueError):
    """The workdir holds tiles of a different job (other inputs, model, or settings)."""


# ---------------------------------------------------------------------------------------------- arguments
def check_tile_size(tile_size, allow_none: bool = False) -> None:
    if tile_size is None and allow_none:
        return
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int (samples per tile side){' or None' if allow_none else ''}"
                         f", got {tile_size!r}")


def engine_settings(engine_kwargs: dict) -> dict:
    """The engine's keyword arguments with its defaults filled in; unknown or reserved names are refused."""
    sig = inspect.signature(_engine.empirical_ntk).parameters
    for k in engine_kwargs:
        if k in ("progress", "distributed"):
            raise TypeError(f"{k!r} is not an engine argument here: the tiled job has its own progress and "
                            f"distribution")
        if k not in _ENGINE_ARGS:
            raise TypeError(f"unexpected keyword argument {k!r}; the engine's are {list(_ENGINE_ARGS)}")
    return {k: engine_kwargs.get(k, sig[k].default) for k in _ENGINE_ARGS}


def validate(model, inputs1, inputs2, settings: dict) -> None:
    """The engine's own argument checks, run once up front (before any tile, file or collective)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _engine._check_args(inputs1, inputs2, settings["mode"], settings["kernel"], settings["strategy"],
                        settings["block_size"], settings["dtype"])
    _engine._check_budget(settings["memory_budget"], False)
    _engine.select_params(model, settings["params"])


def is_symmetric(inputs2, kernel: str) -> bool:
    return inputs2 is None and kernel != "asymmetric_signgd"


def probe_outputs(model: nn.Module, inputs, output_fn: Optional[Callable]) -> Tensor:
    """The (1, C) outputs (after ``output_fn``) of one forward on the first sample (no graph)."""
    with torch.no_grad():
        out = _engine._call(model, _engine._slice(inputs, 0, 1))
        return _engine._outputs(out, output_fn, 1)


def num_outputs(model: nn.Module, inputs, output_fn: Optional[Callable]) -> int:
    """C, from one forward on the first sample (no graph)."""
    return probe_outputs(model, inputs, output_fn).shape[1]


# the output_fn fingerprint keeps at most this many probe values (evenly spaced) besides their sum and |sum|
_PROBE_VALUES = 64
# relative tolerance of the probe comparison: a resume on another device / BLAS rounds the forward differently
_PROBE_RTOL = 1e-3


def output_fn_fingerprint(output_fn: Optional[Callable], probe: Tensor) -> Optional[dict]:
    """What a resume must match of ``output_fn``: its qualified name and its behaviour, the probe outputs
    ``output_fn(model(first sample))`` (their shape, up to 64 values, their sum and absolute sum).  The values are
    compared with a tolerance (``same_output_fn``), not hashed: the same job resumed on another device or BLAS
    rounds the forward differently, while another function gives other outputs."""
    if output_fn is None:
        return None
    v = probe.detach().reshape(-1).double().cpu()
    idx = torch.linspace(0, max(v.numel() - 1, 0), min(v.numel(), _PROBE_VALUES)).round().long()
    return {"qualname": getattr(output_fn, "__qualname__", type(output_fn).__qualname__),
            "shape": list(probe.shape), "values": v[idx].tolist(), "sum": v.sum().item(),
            "abs_sum": v.abs().sum().item()}


def same_output_fn(stored, now) -> bool:
    """Whether two ``output_fn_fingerprint`` s describe the same function (probe values within _PROBE_RTOL)."""
    if stored is None or now is None or not isinstance(stored, dict):
        return stored == now
    if stored.get("qualname") != now["qualname"] or stored.get("shape") != now["shape"]:
        return False
    try:
        a = torch.tensor(list(stored["values"]) + [stored["sum"], stored["abs_sum"]], dtype=torch.float64)
    except (KeyError, TypeError, ValueError):
        return False
    b = torch.tensor(now["values"] + [now["sum"], now["abs_sum"]], dtype=torch.float64)
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=_PROBE_RTOL, atol=_PROBE_RTOL * scale, equal_nan=True))


def tile_grid(n1: int, n2: int, tile_size: int, symmetric: bool) -> List[Tile]:
    """The tiles (ti, tj, rows, cols) of an (n1, n2) kernel in row-major order; symmetric: tj >= ti only."""
    rows = [(i, min(i + tile_size, n1)) for i in range(0, n1, tile_size)]
    cols = [(j, min(j + tile_size, n2)) for j in range(0, n2, tile_size)]
    return [(ti, tj, r, c) for ti, r in enumerate(rows) for tj, c in enumerate(cols) if not (symmetric and tj < ti)]


def kernel_shape(n1: int, n2: int, c: int, mode: str) -> Tuple[int, ...]:
    return {"full": (n1, n2, c, c), "diagonal": (n1, n2, c), "trace": (n1, n2)}[mode]


def compute_tile(model, inputs1, inputs2, tile: Tile, symmetric: bool, settings: dict) -> Tensor:
    """One tile K[r0:r1, c0:c1] from the engine: a diagonal tile of a symmetric job is the engine's symmetric call."""
    ti, tj, (r0, r1), (c0, c1) = tile
    x1 = _engine._slice(inputs1, r0, r1)
    if symmetric and ti == tj:
        x2 = None
    else:
        x2 = _engine._slice(inputs1 if inputs2 is None else inputs2, c0, c1)
    return _engine.empirical_ntk(model, x1, x2, progress=False, **settings)


def mirror(tile: Tensor, mode: str) -> Tensor:
    return _engine._mirror(tile, mode)


def place(K, tile: Tile, value: Tensor, symmetric: bool, mode: str) -> None:
    """Write a tile (and, for a symmetric job's off-diagonal tile, its mirror) into K (a Tensor or a numpy array)."""
    ti, tj, (r0, r1), (c0, c1) = tile
    if isinstance(K, Tensor):
        K[r0:r1, c0:c1] = value.to(K.device)
        if symmetric and ti != tj:
            K[c0:c1, r0:r1] = mirror(value, mode).to(K.device)
    else:
        v = value.detach().cpu()
        K[r0:r1, c0:c1] = v.numpy()
        if symmetric and ti != tj:
            K[c0:c1, r0:r1] = mirror(v, mode).numpy()


# ---------------------------------------------------------------------------------------------- fingerprints
def _hash_tensor(h, name: str, t: Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module, params) -> str:
    """sha256 of the model's class, state_dict (names, dtypes, shapes, bytes) and the selected parameters' names."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in model.state_dict(keep_vars=False).items():
        if isinstance(t, Tensor):
            _hash_tensor(h, name, t)
    h.update(repr([n for n, _ in _engine.select_params(model, params)]).encode())
    return h.hexdigest()


def inputs_fingerprint(inputs1, inputs2) -> str:
    """sha256 of inputs1 and inputs2 (None, a Tensor or a mapping: keys, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for tag, x in (("inputs1", inputs1), ("inputs2", inputs2)):
        if x is None:
            h.update(f"{tag}:None".encode())
        elif isinstance(x, Tensor):
            _hash_tensor(h, tag, x)
        else:
            for k in sorted(x):
                _hash_tensor(h, f"{tag}[{k}]", x[k])
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def job_manifest(model, inputs1, inputs2, tile_size: int, settings: dict) -> dict:
    """What identifies a tiled job: a resume must match every field but ``info``."""
    n1 = _engine._batch(inputs1)
    n2 = n1 if inputs2 is None else _engine._batch(inputs2)
    out_fn = settings["output_fn"]
    probe = probe_outputs(model, inputs1, out_fn)
    return {
        "format": FORMAT, "N1": n1, "N2": n2, "C": probe.shape[1],
        "mode": settings["mode"], "kernel": settings["kernel"], "dtype": _dtype_name(settings["dtype"]),
        "tile_size": tile_size, "symmetric": is_symmetric(inputs2, settings["kernel"]),
        "output_fn": output_fn_fingerprint(out_fn, probe),
        "model_fingerprint": model_fingerprint(model, settings["params"]),
        "inputs_fingerprint": inputs_fingerprint(inputs1, inputs2),
        # recorded, not checked: they change rounding, not the kernel
        "info": {"strategy": settings["strategy"], "block_size": settings["block_size"],
                 "params": settings["params"] if isinstance(settings["params"], (str, list, tuple, type(None)))
                 else repr(settings["params"])},
    }


# ---------------------------------------------------------------------------------------------- the store
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable) -> None:
    """write(fileobj) into a temporary file next to ``path``, fsync, then os.replace: ``path`` is either absent or
    complete, whenever the process dies."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


class TileStore:
    """A directory of finished tiles with a manifest; see the module docstring."""

    def __init__(self, workdir: str, manifest: dict, create: bool = True):
        if not isinstance(workdir, (str, os.PathLike)):
            raise TypeError(f"workdir must be a path (str or os.PathLike), got {type(workdir).__name__}")
        self.path = os.fspath(workdir)
        self.manifest = manifest
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"workdir {self.path!r} exists and is not a directory")
        mpath = os.path.join(self.path, MANIFEST)
        if os.path.exists(mpath):
            self._check(mpath)
        elif create:
            if os.path.isdir(self.path) and any(n.startswith("tile_") for n in os.listdir(self.path)):
                raise TileStoreMismatch(f"workdir {self.path!r} holds tile files but no {MANIFEST}: refusing to mix "
                                        f"them with a new job; use an empty directory")
            os.makedirs(self.path, exist_ok=True)
            atomic_write(mpath, lambda fh: fh.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))
        else:
            raise FileNotFoundError(f"workdir {self.path!r} has no {MANIFEST} (rank 0 creates it)")

    def _check(self, mpath: str) -> None:
        try:
            with open(mpath) as fh:
                stored = json.load(fh)
        except (OSError, ValueError) as e:
            raise TileStoreMismatch(f"workdir {self.path!r}: cannot read {MANIFEST} ({e})") from e
        diffs = []
        for k, v in self.manifest.items():
            if k == "info":
                continue
            if k == "output_fn":
                if not same_output_fn(stored.get(k), v):
                    diffs.append(f"output_fn: stored {stored.get(k)!r}, now {v!r} (another function, or one giving "
                                 f"other outputs on the first sample)")
            elif stored.get(k) != v:
                diffs.append(f"{k}: stored {stored.get(k)!r}, now {v!r}")
        if diffs:
            what = "; ".join(diffs)
            raise TileStoreMismatch(f"workdir {self.path!r} holds tiles of a different job, refusing to resume: "
                                    f"{what}. Use another workdir, or delete this one to start over")

    def clean_tmp(self) -> None:
        """Remove temporary files left by a killed writer (call while no other process writes here)."""
        for n in os.listdir(self.path):
            if n.startswith(".") and ".tmp." in n:
                try:
                    os.unlink(os.path.join(self.path, n))
                except OSError:
                    pass

    def tile_path(self, tile: Tile) -> str:
        return os.path.join(self.path, f"tile_r{tile[0]}_c{tile[1]}.pt")

    def expected_shape(self, tile: Tile) -> Tuple[int, ...]:
        (r0, r1), (c0, c1) = tile[2], tile[3]
        return kernel_shape(r1 - r0, c1 - c0, self.manifest["C"], self.manifest["mode"])

    def has(self, tile: Tile) -> bool:
        return os.path.exists(self.tile_path(tile))

    def load(self, tile: Tile) -> Optional[Tensor]:
        """The stored tile, or None when absent or unreadable (then it is removed, to be computed again)."""
        p = self.tile_path(tile)
        if not os.path.exists(p):
            return None
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
            ok = isinstance(t, Tensor) and tuple(t.shape) == self.expected_shape(tile) \
                and _dtype_name(t.dtype) == self.manifest["dtype"]
        except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
            ok, t = False, e
        if not ok:
            why = t if isinstance(t, Exception) else "shape or dtype"
            warnings.warn(f"tile file {p} is unreadable or of the wrong shape ({why}); computing it again")
            try:
                os.unlink(p)
            except OSError:
                pass
            return None
        return t

    def save(self, tile: Tile, value: Tensor) -> None:
        v = value.detach().cpu().contiguous()
        atomic_write(self.tile_path(tile), lambda fh: torch.save(v, fh))


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """tqdm when installed, else one updating stderr line; ``progress`` a bool or a callable (done, total)."""

    def __init__(self, progress, total: int, initial: int = 0, desc: str = "eNTK tiles"):
        self.cb, self.bar, self.done, self.total, self.desc = None, None, initial, total, desc
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress must be a bool or a callable (done, total) -> None, got "
                            f"{type(progress).__name__}")
        if callable(progress):
            self.cb = progress
        elif progress:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="tile", file=sys.stderr)
            except ImportError:
                self.cb = self._line
        if self.cb is not None and initial:
            self.cb(initial, total)

    def _line(self, done, total):
        sys.stderr.write(f"\r{self.desc}: {done}/{total}" + ("\n" if done == total else ""))
        sys.stderr.flush()

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.cb is not None:
            self.cb(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _test_sleep() -> None:
    s = os.environ.get(_SLEEP_ENV)
    if s:
        time.sleep(float(s))


def run_tiles(model, inputs1, inputs2, tiles: Sequence[Tile], symmetric: bool, settings: dict,
              store: Optional[TileStore], progress, desc: str = "eNTK tiles") -> Iterator[Tuple[Tile, Tensor]]:
    """(tile, value) for every tile: loaded from ``store`` where finished, else computed (and saved there)."""
    todo = {t[:2] for t in tiles if store is None or not store.has(t)}
    bar = Progress(progress, len(tiles), len(tiles) - len(todo), desc)
    try:
        for t in tiles:
            value = None if store is None else store.load(t)
            if value is None:
                value = compute_tile(model, inputs1, inputs2, t, symmetric, settings)
                if store is not None:
                    store.save(t, value)
                    _test_sleep()
                if t[:2] in todo:  # (a stored tile found unreadable was counted as done already)
                    bar.update()
            yield t, value
    finally:
        bar.close()


def open_npy(path: str, shape, dtype: torch.dtype):
    """A new .npy file of ``shape`` opened as a writable memmap (numpy.lib.format.open_memmap)."""
    from numpy.lib.format import open_memmap

    check_npy_path(path, dtype)
    return open_memmap(os.fspath(path), mode="w+", dtype=torch.empty(0, dtype=dtype).numpy().dtype,
                       shape=tuple(shape))


def partial_path(out) -> str:
    """The hidden file a .npy result is written into before it is complete (the same name on every rank)."""
    out = os.fspath(out)
    return os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.partial.npy")


def finish_npy(tmp: str, out) -> None:
    """fsync the complete .npy written in place at ``tmp``, then rename it to ``out`` (and fsync the directory):
    ``out`` appears only once complete."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.fspath(out))
    _fsync_dir(os.path.dirname(os.path.abspath(os.fspath(out))))


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def check_npy_path(path, dtype: torch.dtype) -> None:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".npy"):
        raise ValueError(f"out must be a path ending in .npy, got {path!r}")
    if dtype == torch.bfloat16:
        raise ValueError("out=*.npy cannot hold bfloat16 (numpy has no bfloat16): use dtype=torch.float32")
    d = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"out: directory {d!r} does not exist")


def compute_ntk_tiled(model: nn.Module, inputs1, inputs2=None, *, workdir: Optional[str], tile_size: int,
                      progress: Union[bool, Callable[[int, int], None]] = False, out: Optional[str] = None,
                      **engine_kwargs):
    """The eNTK of ``ntk_kernels.empirical_ntk`` computed tile by tile, resumable from ``workdir``.

    K[r0:r1, c0:c1] = empirical_ntk(model, inputs1[r0:r1], inputs2[c0:c1], **engine_kwargs) for tiles of
    ``tile_size`` samples a side (the last ones smaller); inputs2=None: the tiles j >= i, mirrored (exactly
    symmetric).  Result (N1, N2, C, C) / (N1, N2) / (N1, N2, C) for mode full / trace / diagonal.

    workdir    a directory (created if absent) holding manifest.json and one file per finished tile; a rerun
               with the same model, inputs and settings loads the finished tiles and computes the rest (killed
               at any moment, it loses no finished tile); other inputs / model / mode / kernel / dtype /
               tile_size raise ``TileStoreMismatch``.  None: no store (the tiles are only kept in memory).
    tile_size  samples per tile side (positive int); the engine picks its own block size inside a tile.
    progress   True: a tqdm bar (or a stderr line without tqdm); a callable gets (tiles done, tiles total).
    out        None: return a Tensor; a path ending in .npy: the tiles are written into a hidden partial .npy next
               to it (memmap, for kernels larger than RAM), renamed to ``out`` once complete (a failed or killed
               job leaves no ``out``), and a read-only numpy memmap of it is returned.
    engine_kwargs  params, mode, kernel, output_fn, block_size, memory_budget, strategy, dtype of the engine.
    """
    check_tile_size(tile_size)
    settings = engine_settings(engine_kwargs)
    validate(model, inputs1, inputs2, settings)
    _engine._check_budget(None, progress)
    if out is not None:
        check_npy_path(out, settings["dtype"])
    manifest = job_manifest(model, inputs1, inputs2, tile_size, settings)
    store = None
    if workdir is not None:
        store = TileStore(workdir, manifest)
        store.clean_tmp()
    symmetric = manifest["symmetric"]
    tiles = tile_grid(manifest["N1"], manifest["N2"], tile_size, symmetric)
    shape = kernel_shape(manifest["N1"], manifest["N2"], manifest["C"], manifest["mode"])
    if out is None:
        K = torch.empty(shape, dtype=settings["dtype"], device=_engine._device(inputs1))
        for t, value in run_tiles(model, inputs1, inputs2, tiles, symmetric, settings, store, progress):
            place(K, t, value, symmetric, manifest["mode"])
        return K
    tmp = partial_path(out)
    try:
        K = open_npy(tmp, shape, settings["dtype"])
        for t, value in run_tiles(model, inputs1, inputs2, tiles, symmetric, settings, store, progress):
            place(K, t, value, symmetric, manifest["mode"])
        K.flush()
        del K
        finish_npy(tmp, out)
    except BaseException:
        remove_quietly(tmp)
        raise
    import numpy as np
    return np.load(os.fspath(out), mmap_mode="r")
