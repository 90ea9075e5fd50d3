"""``ffc-export CHECKPOINT OUT.pt``: the backbone alone, as a plain fp32 ``state_dict`` for inference
(``backbone.load_state_dict(torch.load(OUT.pt))``); the class centers are left out."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..checkpoint import atomic_torch_save, resolve_tag

PREFIX = "backbone."


def backbone_state_dict(tag_dir: Path) -> dict:
    """fp32 backbone weights of a checkpoint, whatever its ZeRO stage (ZeRO partitions are merged)."""
    tag_dir = Path(tag_dir)
    if list(tag_dir.glob("*optim_states.pt")) and list(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no DeepSpeed model states in {tag_dir}")
        full = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    out = {k[len(PREFIX):]: v.float() if v.is_floating_point() else v for k, v in full.items() if k.startswith(PREFIX)}
    if not out:
        raise ValueError(f"{tag_dir} holds no '{PREFIX}*' weights: was it saved by ffc_parallel's engine?")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ffc-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory written by engine.save_checkpoint")
    parser.add_argument("out", help="output file (torch.save of the backbone's state_dict)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    args = parser.parse_args(argv)
    try:
        _, tag_dir = resolve_tag(args.checkpoint, args.tag)
        state = backbone_state_dict(tag_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ffc-export: {exc}", file=sys.stderr)
        return 2
    atomic_torch_save(state, Path(args.out))
    print(f"ffc-export: {len(state)} backbone tensors, {sum(v.numel() for v in state.values())} values -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
