"""The empirical NTK shared among the ranks of a torch.distributed process group (torchrun; gloo or NCCL).

The Gram matrix K (N1, N2[, C[, C]]) is cut into tiles of ``tile_size`` samples a side,

    K[r0:r1, c0:c1] = ntk_kernels.empirical_ntk(model, inputs1[r0:r1], inputs2[c0:c1], **engine_kwargs),

with inputs2=None only the tiles j >= i (each computed once; K[c0:c1, r0:r1] is its mirror, so K is exactly
symmetric).  The tiles go to the ranks by a balanced greedy assignment (largest first, to the least loaded rank;
the cost of a tile taken as r·c + r + c: the pairs plus the forwards), the same on every rank, so no
coordination is needed to compute.  Every rank calls the engine on its own tiles, then either

  out=None       rank 0 receives every rank's tiles (point to point, one message a rank) and returns K; the other
                 ranks return None;
  out="K.npy"    rank 0 creates one hidden partial .npy file of K's shape next to it (numpy.lib.format.open_memmap)
                 before a barrier, every rank writes its tiles into it through a memmap (the rows of K never pass
                 through one host's memory), and once every rank has finished rank 0 renames it to K.npy (a failed
                 or killed job leaves no K.npy) and returns a read-only numpy memmap of it (the others None).
                 Across hosts the path must be on a shared filesystem that keeps concurrent writes to one file
                 coherent (Lustre, GPFS; not NFS): otherwise use ``workdir`` and out=None.

``workdir`` makes the job resumable: each rank writes its finished tiles (atomically) into the tile store of
``ntk_kernels._tiles`` and, rerun, loads them instead of computing them.

Every rank must pass the same model, inputs and arguments: their fingerprints are compared first, and an argument
error on any rank is raised on every rank (no rank is left waiting in a collective).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import _tiles
from .ntk import empirical as _engine


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("ntk_kernels.distributed needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: start the script with torchrun (e.g. torchrun "
                           "--nproc_per_node 8 script.py) and call torch.distributed.init_process_group('nccl' on "
                           "GPUs, 'gloo' on CPUs) before ntk_kernels.distributed.empirical_ntk")
    return dist


def default_tile_size(n1: int, n2: int, symmetric: bool, world: int) -> int:
    """The largest tile side giving at least 2 tiles a rank (one tile for a single rank): big tiles reuse each
    block's features inside the engine, several a rank keep the ranks' loads even."""
    want = 1 if world == 1 else 2 * world
    n = max(n1, n2)
    for k in range(1, n + 1):
        ts = math.ceil(n / k)
        rows, cols = math.ceil(n1 / ts), math.ceil(n2 / ts)
        count = rows * (rows + 1) // 2 if symmetric else rows * cols
        if count >= want:
            return ts
    return 1


def assign_tiles(tiles: Sequence[_tiles.Tile], world: int) -> List[List[_tiles.Tile]]:
    """Tiles per rank: largest cost first to the least loaded rank (ties: lowest rank), each rank's list in grid
    order.  Deterministic: every rank computes the same assignment."""
    def cost(t):
        r, c = t[2][1] - t[2][0], t[3][1] - t[3][0]
        return r * c + r + c

    load = [0] * world
    owned: List[List[int]] = [[] for _ in range(world)]
    for k in sorted(range(len(tiles)), key=lambda k: (-cost(tiles[k]), k)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += cost(tiles[k])
        owned[r].append(k)
    return [[tiles[k] for k in sorted(ks)] for ks in owned]


def _cheap_model_digest(model: nn.Module, params) -> bytes:
    """Names, dtypes, shapes and float64 sums of every state tensor, computed where they live: enough to tell two
    ranks' models apart without copying the weights to the host (the workdir's manifest hashes their bytes)."""
    h = hashlib.sha256()
    sums = []
    for name, t in model.state_dict().items():
        if isinstance(t, Tensor):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            if t.numel() and t.dtype != torch.bool:
                v = t.detach().reshape(-1)
                v = v.real.double() if t.is_complex() else v.double()
                sums.append(torch.stack([v.sum(), v.abs().sum()]).cpu())
    if sums:
        h.update(torch.cat(sums).numpy().tobytes())
    h.update(repr([n for n, _ in _engine.select_params(model, params)]).encode())
    return h.digest()


def _comm_device(dist, group, inputs=None) -> torch.device:
    """Where the collectives' tensors live: the CPU for gloo; for NCCL the inputs' GPU (each rank's model and inputs
    are on its own GPU, whatever the current device), else the current one."""
    if "nccl" not in str(dist.get_backend(group)).lower():
        return torch.device("cpu")
    try:
        d = _engine._device(inputs)
    except Exception:  # noqa: BLE001 - bad inputs are reported by the argument checks (on every rank)
        d = None
    if d is not None and d.type == "cuda":
        return d if d.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", torch.cuda.current_device())


def _agree(dist, group, device, err: Optional[BaseException], digest: bytes = b"") -> None:
    """Every rank learns whether any rank failed and whether their digests agree; then each raises the same way.
    A collective: every rank of ``group`` must call it."""
    world = dist.get_world_size(group)
    payload = torch.tensor([0 if err is None else 1] + list(digest.ljust(32, b"\0")[:32]), dtype=torch.int64,
                           device=device)
    got = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(got, payload, group=group)
    got = [g.cpu() for g in got]
    failed = [r for r, g in enumerate(got) if g[0].item()]
    if failed:  # every rank knows: all take part in passing the messages on
        msgs = [None] * world
        dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}", group=group)
        if err is not None:
            raise err
        what = "; ".join(f"rank {r}: {msgs[r]}" for r in failed)
        raise RuntimeError(f"ntk_kernels.distributed.empirical_ntk: rank(s) {failed} of the group failed, so this "
                           f"rank stops too ({what})")
    differ = [r for r, g in enumerate(got) if not torch.equal(g[1:], got[0][1:])]
    if differ:
        raise ValueError(f"ntk_kernels.distributed.empirical_ntk: rank(s) {differ} were given another model, other "
                         f"inputs or other arguments than rank 0 (sizes, tile_size, mode, kernel, dtype, parameter "
                         f"values or input values differ); every rank must pass the same")


def _agree_or_drop(dist, group, device, err, rank: int, tmp: Optional[str]) -> None:
    """``_agree``; when it raises, rank 0 removes the partial .npy ``tmp`` (no half-written result is left)."""
    try:
        _agree(dist, group, device, err)
    except BaseException:
        if rank == 0 and tmp is not None:
            _tiles.remove_quietly(tmp)
        raise


def _wire(t: Tensor) -> Tensor:
    """A view the backends can send: bfloat16 travels bit for bit as int16."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def empirical_ntk(model: nn.Module, inputs1, inputs2=None, *, tile_size: Optional[int] = None, group=None,
                  out: Optional[Union[str, os.PathLike]] = None, workdir: Optional[Union[str, os.PathLike]] = None,
                  progress: Union[bool, Callable[[int, int], None]] = False, **engine_kwargs):
    """``ntk_kernels.empirical_ntk`` with its tiles shared among the ranks of a torch.distributed group.

    Call it on every rank of ``group`` with the same arguments (each rank's model and inputs on its own device:
    cuda:LOCAL_RANK with NCCL, the CPU with gloo).  K (N1, N2, C, C) / (N1, N2) / (N1, N2, C) for mode full / trace
    / diagonal, equal (up to the engine's rounding, exactly symmetric for inputs2=None) to the single-process
    ``empirical_ntk(model, inputs1, inputs2, **engine_kwargs)``.

    tile_size  samples per tile side (positive int); default: the largest giving every rank at least 2 tiles.
    group      the process group (default: the world).
    out        None: K gathered on rank 0 (a Tensor on inputs1's device), None returned on the others.  A path
               ending in .npy: every rank writes its tiles into one hidden partial file next to it (created by
               rank 0, renamed to ``out`` by rank 0 once every rank has finished), rank 0 returns
               numpy.load(out, mmap_mode="r"), the others None.
    workdir    a tile store directory (see ``ntk_kernels._tiles.compute_ntk_tiled``): finished tiles are kept on
               disk by each rank and a rerun with the same job resumes; a different job is refused.
    progress   True: a bar of rank 0's tiles; a callable (done, total) is called on every rank for its tiles.
    engine_kwargs  params, mode, kernel, output_fn, block_size, memory_budget (per rank: several ranks on one host
               share its memory), strategy, dtype.
    """
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group it was given")
    device = _comm_device(dist, group, inputs1)

    err, digest, info = None, b"", None
    try:
        _tiles.check_tile_size(tile_size, allow_none=True)
        settings = _tiles.engine_settings(engine_kwargs)
        _tiles.validate(model, inputs1, inputs2, settings)
        if out is not None:
            _tiles.check_npy_path(out, settings["dtype"])
        if workdir is not None and not isinstance(workdir, (str, os.PathLike)):
            raise TypeError(f"workdir must be a path (str or os.PathLike), got {type(workdir).__name__}")
        n1 = _engine._batch(inputs1)
        n2 = n1 if inputs2 is None else _engine._batch(inputs2)
        symmetric = _tiles.is_symmetric(inputs2, settings["kernel"])
        ts = tile_size or default_tile_size(n1, n2, symmetric, world)
        C = _tiles.num_outputs(model, inputs1, settings["output_fn"])
        mode = settings["mode"]
        key = {"N1": n1, "N2": n2, "C": C, "tile_size": ts, "symmetric": symmetric, "mode": mode,
               "kernel": settings["kernel"], "dtype": str(settings["dtype"]), "out": None if out is None else
               os.path.abspath(os.fspath(out)), "workdir": workdir is not None,
               "inputs": _tiles.inputs_fingerprint(inputs1, inputs2)}
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
        h.update(_cheap_model_digest(model, settings["params"]))
        digest = h.digest()
    except Exception as e:  # noqa: BLE001 - raised below, after the other ranks learn of it
        err = e
    _agree(dist, group, device, err, digest)

    tiles = _tiles.tile_grid(n1, n2, ts, symmetric)
    mine = assign_tiles(tiles, world)[rank]

    store = None
    if workdir is not None:  # rank 0 creates (or checks) the manifest first, then the others check it
        err = None
        try:
            manifest = _tiles.job_manifest(model, inputs1, inputs2, ts, settings)
            if rank == 0:
                store = _tiles.TileStore(workdir, manifest)
                store.clean_tmp()
        except Exception as e:  # noqa: BLE001
            err = e
        _agree(dist, group, device, err)
        if rank != 0:
            try:  # on a filesystem not shared with rank 0 this rank keeps its own manifest
                store = _tiles.TileStore(workdir, manifest)
            except Exception as e:  # noqa: BLE001
                err = e
        _agree(dist, group, device, err)

    shape = _tiles.kernel_shape(n1, n2, C, mode)
    K = None
    tmp = None if out is None else _tiles.partial_path(out)
    if out is not None:
        err = None
        if rank == 0:
            try:
                mm = _tiles.open_npy(tmp, shape, settings["dtype"])
                mm.flush()
                del mm
            except Exception as e:  # noqa: BLE001
                err = e
        _agree(dist, group, device, err)  # the partial file exists for everyone after this
        import numpy as np
        try:
            K = np.load(tmp, mmap_mode="r+")
        except Exception as e:  # noqa: BLE001
            err = e
        _agree_or_drop(dist, group, device, err, rank, tmp)

    show = progress if (callable(progress) and not isinstance(progress, bool)) else (bool(progress) and rank == 0)
    values: List[Tensor] = []
    err = None
    try:
        for t, v in _tiles.run_tiles(model, inputs1, inputs2, mine, symmetric, settings, store, show,
                                     desc=f"eNTK tiles (rank {rank}/{world})"):
            if K is not None:
                _tiles.place(K, t, v, symmetric, mode)
            else:
                values.append(v)
        if K is not None:
            K.flush()
    except Exception as e:  # noqa: BLE001
        err = e
    # every rank's tiles are finished (and, for out, flushed) after this
    _agree_or_drop(dist, group, device, err, rank, tmp)

    if out is not None:
        del K
        err = None
        if rank == 0:  # complete: the partial file becomes ``out``
            try:
                _tiles.finish_npy(tmp, out)
            except Exception as e:  # noqa: BLE001
                err = e
        _agree_or_drop(dist, group, device, err, rank, tmp)
        import numpy as np
        return np.load(os.fspath(out), mmap_mode="r") if rank == 0 else None

    owned = assign_tiles(tiles, world)
    dtype = settings["dtype"]

    def numel(t):
        return math.prod(_tiles.kernel_shape(t[2][1] - t[2][0], t[3][1] - t[3][0], C, mode))

    def global_rank(r):
        return r if group is None else dist.get_global_rank(group, r)

    # the messages are prepared first and the ranks agree before any send / recv, so a rank that fails to build
    # its message cannot leave rank 0 waiting in recv; a failure while passing them is shared afterwards
    err, buf, K = None, None, None
    try:
        if rank != 0:
            if values:  # tiles loaded from the store are on the CPU, computed ones on the compute device
                buf = _wire(torch.cat([v.to(device).reshape(-1) for v in values])).contiguous()
        else:
            K = torch.empty(shape, dtype=dtype, device=_engine._device(inputs1))
            for t, v in zip(mine, values):
                _tiles.place(K, t, v, symmetric, mode)
    except Exception as e:  # noqa: BLE001
        err = e
    _agree(dist, group, device, err)

    err = None
    try:
        if rank != 0:
            if buf is not None:
                dist.send(buf, dst=global_rank(0), group=group)
        else:
            for src in range(1, world):
                sizes = [numel(t) for t in owned[src]]
                if not sizes:
                    continue
                buf = torch.empty(sum(sizes), dtype=dtype, device=device)
                dist.recv(_wire(buf), src=global_rank(src), group=group)
                for t, v in zip(owned[src], torch.split(buf, sizes)):
                    (r0, r1), (c0, c1) = t[2], t[3]
                    _tiles.place(K, t, v.reshape(_tiles.kernel_shape(r1 - r0, c1 - c0, C, mode)), symmetric, mode)
    except Exception as e:  # noqa: BLE001
        err = e
    _agree(dist, group, device, err)
    return K if rank == 0 else None
