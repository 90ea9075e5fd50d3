"""A tiny training entry point for the launcher tests: ``python -m tests.launch_entry --deepspeed_config
CFG --out DIR`` trains a HybridModel a few steps and writes ``DIR/rank<R>.json`` (rank, world size,
launcher, losses). Launch scripts select it with ``FFC_ENTRY=tests.launch_entry``."""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import ffc_parallel as fp


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step (the SIGTERM test)")
    parser.add_argument("--local_rank", type=int, default=None)   # passed by the DeepSpeed launcher
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # unwind: the finally below still writes
    info = fp.init_distributed(verbose=False)   # before DeepSpeed is imported: fp.initialize copes
    from tests import cases_engine as cases

    config = json.loads(Path(args.deepspeed_config).read_text())
    micro = config["train_micro_batch_size_per_gpu"]
    head = fp.ShardedClassifier(cases.DIM, 13, margin="cosface", scale=cases.SCALE)
    engine, *_ = fp.initialize(model=fp.HybridModel(cases.make_backbone(), head), config=config)
    losses, stopped = [], True
    try:
        for step in range(args.steps):
            x, y = cases.global_batch(step, micro * info.world_size, 13)
            loss = engine(cases.micro_slice(x, 0, info.rank, info.world_size, micro),
                          cases.micro_slice(y, 0, info.rank, info.world_size, micro))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            Path(args.out, f"rank{info.rank}.step").write_text(f"{step} {os.getpid()}")
            time.sleep(args.step_seconds)
        stopped = False
    finally:
        result = {"rank": info.rank, "world_size": info.world_size, "launcher": info.launcher, "losses": losses,
                  "class_range": list(head.class_range), "stopped": stopped}
        Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    fp.exit_distributed(0)
