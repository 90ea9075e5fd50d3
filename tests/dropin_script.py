"""A training script written the way DeepSpeed's examples are (argparse with
``deepspeed.add_config_arguments``, ``deepspeed.init_distributed()``,
``deepspeed.initialize(args=args, model=net, model_parameters=net.parameters(), training_data=...)``,
``engine(x)``, ``engine.backward(loss)``, ``engine.step()``), with ffc_parallel's head as the classifier.
The lines that differ from the plain-DeepSpeed script are marked ``# ffc_parallel``.

    deepspeed --num_gpus 2 tests/dropin_script.py --deepspeed_config ds.json --out DIR [--save CKPT]
    mpirun -np 2 python tests/dropin_script.py --deepspeed_config ds.json --out DIR

Writes ``DIR/rank<R>.json``: the sample indices and loss of every step, this rank's class range and
centers, the backbone's parameters (tests/test_dropin.py compares them with a dense reference).
"""
import argparse
import importlib
import json
from pathlib import Path

import deepspeed
import torch
from torch import nn

import ffc_parallel as fp  # ffc_parallel

IN_DIM, DIM, NUM_CLASSES, SAMPLES, SCALE = 6, 5, 13, 96, 16.0
# Test infrastructure, not a user's change: skip DeepSpeed's CPU shm all-reduce JIT build (see cases_engine.py).
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(IN_DIM, 12), nn.Tanh(), nn.Linear(12, DIM))
        self.classifier = fp.ShardedClassifier(DIM, NUM_CLASSES, margin="cosface", scale=SCALE)  # ffc_parallel

    def forward(self, x, labels):
        return self.classifier(self.features(x), labels)  # ffc_parallel: the head computes the loss


def dataset():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(SAMPLES, IN_DIM, generator=g), torch.randint(NUM_CLASSES, (SAMPLES,), generator=g)
    return torch.utils.data.TensorDataset(x, y, torch.arange(SAMPLES))


def main():
    parser = argparse.ArgumentParser(description="DeepSpeedExamples-style training with ffc_parallel's head")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save", default=None, help="fp.save_checkpoint into this directory at the end")
    parser.add_argument("--master_port", type=int, default=29500, help="rendezvous port under plain mpirun")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    deepspeed.init_distributed(distributed_port=args.master_port)
    net = Net()
    engine, _, loader, _ = deepspeed.initialize(args=args, model=net, model_parameters=net.parameters(),
                                                training_data=dataset())
    rank = engine.global_rank
    record = {"indices": [], "losses": []}
    batches = iter(loader)
    for _ in range(args.steps * engine.gradient_accumulation_steps()):
        x, y, index = next(batches)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        record["indices"].append(index.tolist())
        record["losses"].append(loss.item())
    if args.save:
        fp.save_checkpoint(engine, args.save)  # ffc_parallel: in place of engine.save_checkpoint
    from deepspeed.utils import safe_get_full_fp32_param
    record["backbone"] = [(safe_get_full_fp32_param(p) if safe_get_full_fp32_param(p) is not None else p).tolist()
                          for p in net.features.parameters()]
    record["class_range"] = list(net.classifier.class_range)
    record["centers"] = net.classifier.weight.detach().tolist()
    record["world_size"] = engine.world_size
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
    fp.exit_distributed(0)  # ffc_parallel, optional: every rank ends past a barrier (no gloo teardown abort)
