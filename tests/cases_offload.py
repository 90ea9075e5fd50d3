"""Per-rank bodies of the center-storage tests: a head whose rows live in host memory or on disk against
the same head on the device, trained side by side under plain ``deepspeed.initialize`` (bit for bit)."""
import torch

import ffc_parallel as fp
from tests.cases_engine import DIM, SCALE, ds_config, ds_engine_of, global_batch, make_backbone, micro_slice

NUM_CLASSES, RATE, MICRO = 203, 0.3, 4


class StoredNet(torch.nn.Module):
    def __init__(self, storage, head_dtype=None, sampling="uniform"):
        super().__init__()
        self.features = make_backbone()
        self.classifier = fp.ShardedClassifier(DIM, NUM_CLASSES, margin="cosface", scale=SCALE, sample_rate=RATE,
                                               dtype=head_dtype, center_storage=storage, negative_sampling=sampling,
                                               sample_block=8, seed=3)

    def forward(self, x, labels=None):
        embeddings = self.features(x)
        return embeddings if labels is None else self.classifier(embeddings, labels)


def _engine(storage, optimizer, gas, head_dtype, sampling="uniform"):
    import deepspeed
    net = StoredNet(storage, head_dtype, sampling)
    config = ds_config(0, optimizer, gas, MICRO, fp.get_world_size())   # stage 0: its checkpoints load at any world size
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    return engine


def _train(engine, steps, gas, first=0):
    rank, world = fp.get_rank(), fp.get_world_size()
    losses = []
    for step in range(first, first + steps):
        x, y = global_batch(step, MICRO * gas * world, NUM_CLASSES)
        for m in range(gas):
            loss = engine(micro_slice(x, m, rank, world, MICRO), micro_slice(y, m, rank, world, MICRO))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def rows_of(engine) -> dict:
    """Every row of the rank's centers and optimizer state, wherever they are stored."""
    head = ds_engine_of(engine).module.classifier
    if head.offloaded:
        values = head.centers.store.read_range(0, head.num_local)
        return {k: (v.view(-1) if k == "step" else v) for k, v in values.items()}
    return {"weight": head.weight.detach().clone(), **{k: v.clone() for k, v in head.centers.optimizer.state.items()}}


def _same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: fields {sorted(a)} vs {sorted(b)}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: field {k!r} differs (max {float((a[k].double() - b[k].double()).abs().max())})"


def stored_equals_device(storage, optimizer, gas, head_dtype=None, steps=4, save_dir=None, sampling="uniform"):
    """Train a device head and a stored head on the same batches: losses, every row and every optimizer
    state row equal bit for bit; optionally save both to ``save_dir/device`` and ``save_dir/stored``."""
    head_dtype = getattr(torch, head_dtype) if head_dtype else None
    device = _engine("device", optimizer, gas, head_dtype, sampling)
    stored = _engine(storage, optimizer, gas, head_dtype, sampling)
    a, b = _train(device, steps, gas), _train(stored, steps, gas)
    assert a == b, f"losses differ: {a} vs {b}"
    _same(rows_of(device), rows_of(stored), "after training")
    head = ds_engine_of(stored).module.classifier
    stats = head.store_stats()
    assert stats["bytes_written"] > 0 and stats["prefetched_rows_used"] > 0, stats
    ids = torch.arange(NUM_CLASSES)[:16].float().unsqueeze(1).expand(16, 6).contiguous()
    for e in (device, stored):
        ds_engine_of(e).module.eval()
    pd, ps = (ds_engine_of(e).module.classifier.predict(ds_engine_of(e).module.features(ids), k=3) for e in (device, stored))
    assert torch.equal(pd[0], ps[0]) and torch.equal(pd[1], ps[1]), "predict differs"
    if save_dir:
        fp.save_checkpoint(device, f"{save_dir}/device")
        fp.save_checkpoint(stored, f"{save_dir}/stored")
        for e in (device, stored):
            ds_engine_of(e).module.train()
        # training goes on after the snapshot: the checkpoint keeps its values (copy-on-write)
        _train(stored, 1, gas, first=steps)
    return {"losses": b, "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}}


def load_and_continue(storage, optimizer, gas, save_dir, head_dtype=None, steps=2, sampling="uniform"):
    """Load ``save_dir/device`` into a device head and ``save_dir/stored`` (or a reshard of it) into a
    stored head, at this world size: equal rows, then equal training."""
    head_dtype = getattr(torch, head_dtype) if head_dtype else None
    device = _engine("device", optimizer, gas, head_dtype, sampling)
    stored = _engine(storage, optimizer, gas, head_dtype, sampling)
    fp.load_checkpoint(device, f"{save_dir}/device")
    fp.load_checkpoint(stored, f"{save_dir}/stored")
    _same(rows_of(device), rows_of(stored), "after loading")
    a, b = _train(device, steps, gas, first=10), _train(stored, steps, gas, first=10)
    assert a == b, f"losses after loading differ: {a} vs {b}"
    _same(rows_of(device), rows_of(stored), "after loading and training")
    return b
