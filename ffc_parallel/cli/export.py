"""``ffc-export CHECKPOINT [OUT.pt] [--onnx OUT.onnx] [--centers OUT.npy]``: a trained model for inference.

* ``OUT.pt``: the model without its class shards, as a plain fp32 ``state_dict``
  (``backbone.load_state_dict(torch.load(OUT.pt))``);
* ``--onnx OUT.onnx``: the backbone as an ONNX model, input ``input`` ``[batch, C, H, W]`` (or
  ``[batch, D]``), output ``embedding`` ``[batch, embedding_dim]``, the batch axis dynamic, opset
  ``--opset`` (default 17); the opset, backbone and input shape are in the model's metadata;
* ``--centers OUT.npy``: the class centers ``[num_classes, embedding_dim]`` (fp32, not normalised), row
  ``c`` = class ``c``, assembled from every rank's shard.

The backbone of ``--onnx`` is rebuilt from what ``ffc-train`` saves with each checkpoint (name, input
shape, embedding size); ``--backbone``, ``--input-shape`` and ``--embedding-dim`` give or override it.
The checkpoint's files are checked against its manifest's sizes and sha256 first; a damaged file, a full
disk or any other failure exits 2 with a message naming the file, leaving no partial output.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import read_manifest, read_rows, resolve_tag
from ..checkpoint_files import (SHARDS_DIR, CheckpointError, atomic_write_bytes, describe, no_space,
                                no_space_message, saved_bytes, verify_checkpoint)
from ..deepspeed_bridge import client_state_of, consolidated_fp32_state_dict, module_states

PREFIX = "backbone."
OPSET = 17


def backbone_state_dict(tag_dir: Path) -> dict:
    """fp32 weights of a checkpoint's model, whatever its ZeRO stage (ZeRO partitions are merged),
    without the sharded parts (heads, class pools); a :class:`~ffc_parallel.HybridModel`'s
    ``backbone.`` prefix is dropped, so the result loads into the backbone itself. Verifies the
    checkpoint's files first (:class:`~ffc_parallel.checkpoint_files.CheckpointError` names a bad one)."""
    manifest = read_manifest(tag_dir)
    verify_checkpoint(tag_dir, manifest, collective=False)
    parts = tuple(f"{name}." for name in manifest["parts"])
    full = consolidated_fp32_state_dict(Path(tag_dir))
    kept = {k: v for k, v in full.items() if not k.startswith(parts) and not k.endswith("_extra_state")}
    if kept and all(k.startswith(PREFIX) for k in kept):
        kept = {k[len(PREFIX):]: v for k, v in kept.items()}
    if not kept:
        raise ValueError(f"{tag_dir} holds no weights besides its class shards")
    return kept


def backbone_spec(tag_dir: Path, name=None, input_shape=None, embedding_dim=None) -> dict:
    """``{"name", "input_shape", "embedding_dim"}`` of the checkpoint's backbone: what ``ffc-train`` saved
    (client state ``"backbone"``), each value replaced by the argument when that is given."""
    saved = client_state_of(module_states(tag_dir)).get("backbone") or {}
    spec = {"name": name or saved.get("name"), "input_shape": input_shape or saved.get("input_shape"),
            "embedding_dim": embedding_dim or saved.get("embedding_dim")}
    missing = [f"--{key.replace('_', '-')}" for key, value in spec.items() if value is None]
    if missing:
        raise ValueError(f"{tag_dir} does not say how its backbone was built (not saved by ffc-train): "
                         f"give {', '.join(missing)}")
    spec["input_shape"] = [int(v) for v in spec["input_shape"]]
    return spec


def write_output(path, write, nbytes: int) -> None:
    """``write(file)`` into ``path`` atomically (no partial file is left); a failure raises
    :class:`CheckpointError` naming ``path`` (a full disk with the space ``nbytes`` needed)."""
    path = Path(path)
    try:
        atomic_write_bytes(path, write)
    except Exception as exc:
        if no_space(exc, path, nbytes):
            raise CheckpointError(no_space_message(path.parent, nbytes, path.name, describe(exc))) from exc
        raise CheckpointError(f"could not write {path}: {describe(exc)}") from exc


def export_onnx(backbone: torch.nn.Module, input_shape, path, *, opset: int = OPSET, metadata=None) -> None:
    """Write ``backbone`` (evaluated in eval mode, fp32, on the CPU) to ``path`` as ONNX: input ``input``
    ``[batch, *input_shape]``, output ``embedding`` ``[batch, D]``, the batch axis dynamic; ``metadata``
    (str -> str) and ``opset`` go into the model's ``metadata_props``. Needs the ``onnx`` package."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("--onnx needs the onnx package: pip install onnx") from exc
    backbone = backbone.float().cpu().eval()
    example = torch.zeros(2, *input_shape)
    # The TorchScript-based exporter: the torch.export-based one (torch >= 2.9's default) needs onnxscript.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(backbone, (example,), str(raw), input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True, **legacy)
        model = onnx.load(str(raw))
    props = {"opset": str(opset), "producer": "ffc_parallel ffc-export", **(metadata or {})}
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    write_output(path, lambda f: f.write(data), len(data))


def write_centers(tag_dir: Path, path, part: str | None = None) -> tuple[int, int]:
    """Every rank's class rows of head ``part`` (default: the checkpoint's only head) in class order,
    as a float32 ``.npy`` ``[num_classes, D]`` written shard by shard; returns its shape."""
    heads = {name: e for name, e in read_manifest(tag_dir)["parts"].items() if e["kind"] == "head"}
    if part is None and len(heads) != 1:
        raise ValueError(f"--centers: {tag_dir} holds {len(heads)} heads ({', '.join(heads) or 'none'}); "
                         "name one with --part")
    part = part if part is not None else next(iter(heads))
    if part not in heads:
        raise ValueError(f"--part {part}: {tag_dir} has no head there (heads: {', '.join(heads) or 'none'})")
    entry = heads[part]
    shape = (entry["num_classes"], entry["embedding_dim"])

    def write(f):
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        for lo, hi in entry["ranges"]:
            if hi > lo:
                rows = read_rows(Path(tag_dir) / SHARDS_DIR / part, entry, lo, hi)["weight"]
                f.write(rows.float().numpy().astype("<f4", copy=False).tobytes())

    write_output(path, write, 4 * shape[0] * shape[1] + 128)
    return shape


def _onnx_from_checkpoint(tag_dir: Path, state: dict, args) -> str:
    from ..models import build_backbone

    spec = backbone_spec(tag_dir, args.backbone, args.input_shape, args.embedding_dim)
    backbone = build_backbone(spec["name"], spec["input_shape"], spec["embedding_dim"])
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint's weights do not fit --backbone {spec['name']} with input shape "
                         f"{spec['input_shape']} and --embedding-dim {spec['embedding_dim']}: {exc}") from None
    shape = ",".join(map(str, spec["input_shape"]))
    export_onnx(backbone, spec["input_shape"], args.onnx, opset=args.opset,
                metadata={"backbone": spec["name"], "input_shape": shape, "embedding_dim": spec["embedding_dim"],
                          "checkpoint": tag_dir.name})
    return f"{spec['name']} [batch, {shape}] -> [batch, {spec['embedding_dim']}], opset {args.opset}"


def _shape(text: str) -> list:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3,112,112, got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ffc-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory written by engine.save_checkpoint")
    parser.add_argument("out", nargs="?", help="output file (torch.save of the backbone's state_dict)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    parser.add_argument("--onnx", help="write the backbone as ONNX to this file")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--centers", help="write the class centers [num_classes, D] to this .npy file")
    parser.add_argument("--part", help="--centers: the head's module path when the model has several")
    parser.add_argument("--backbone", help="--onnx: backbone name (default: the one ffc-train saved)")
    parser.add_argument("--input-shape", type=_shape, help="--onnx: input shape without the batch, e.g. 3,112,112")
    parser.add_argument("--embedding-dim", type=int, help="--onnx: embedding size")
    args = parser.parse_args(argv)
    if not (args.out or args.onnx or args.centers):
        parser.error("nothing to write: give OUT.pt, --onnx OUT.onnx and/or --centers OUT.npy")
    try:
        _, tag_dir = resolve_tag(args.checkpoint, args.tag)
        if args.out or args.onnx:
            state = backbone_state_dict(tag_dir)   # verifies the checkpoint's files
        else:
            verify_checkpoint(tag_dir, read_manifest(tag_dir), collective=False)
        if args.out:
            write_output(args.out, lambda f: torch.save(state, f), saved_bytes(state))
            print(f"ffc-export: {len(state)} backbone tensors, {sum(v.numel() for v in state.values())} values "
                  f"-> {args.out}")
        if args.onnx:
            print(f"ffc-export: {_onnx_from_checkpoint(tag_dir, state, args)} -> {args.onnx}")
        if args.centers:
            rows, dim = write_centers(tag_dir, args.centers, args.part)
            print(f"ffc-export: {rows} class centers x {dim} -> {args.centers}")
    except (CheckpointError, OSError, ValueError, ImportError) as exc:
        print(f"ffc-export: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
