"""Per-rank bodies of the checkpoint tests (run through ffc_parallel.testing.run_ranks)."""
from pathlib import Path

import torch

import ffc_parallel as fp
from tests.cases_engine import build, full_backbone, global_batch, micro_slice

NUM_CLASSES, MICRO = 23, 2


def _train(engine, steps, first_step, gas=1):
    rank, world = fp.get_rank(), fp.get_world_size()
    losses = []
    for step in range(first_step, first_step + steps):
        x, y = global_batch(step, MICRO * gas * world, NUM_CLASSES)
        for m in range(gas):
            loss = engine(micro_slice(x, m, rank, world, MICRO), micro_slice(y, m, rank, world, MICRO))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def save_after_training(ckpt, reference, stage, optimizer, steps=2, sample_rate=1.0):
    """Train ``steps`` steps, save; also write an independent plain copy of this rank's centers,
    optimizer state and the full backbone for the loading side to compare against."""
    engine, _ = build(stage, optimizer, 1, MICRO, NUM_CLASSES, sample_rate=sample_rate)
    _train(engine, steps, 0)
    tag = engine.save_checkpoint(ckpt)
    Path(reference).mkdir(exist_ok=True)
    torch.save({"class_range": engine.head.class_range, "weight": engine.head.weight.detach().clone(),
                "state": {k: v.clone() for k, v in engine.head_optimizer.state.items()},
                "backbone": full_backbone(engine), "sample_step": engine.head.sample_step},
               Path(reference) / f"rank{fp.get_rank()}.pt")
    return tag


def _reference_rows(reference, start, stop):
    parts = sorted(Path(reference).glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
    saved = [torch.load(p) for p in parts]
    saved.sort(key=lambda s: s["class_range"][0])
    weight = torch.cat([s["weight"] for s in saved])[start:stop]
    state = {k: torch.cat([s["state"][k] for s in saved])[start:stop] for k in saved[0]["state"]}
    return weight, state, saved[0]


def load_matches_saved(ckpt, reference, stage, optimizer, steps=2):
    """Load at this world size: centers and optimizer rows bit-identical to the saved ones, backbone
    equal, counters restored; then one more step runs."""
    engine, _ = build(stage, optimizer, 1, MICRO, NUM_CLASSES)
    engine.load_checkpoint(ckpt)
    start, stop = engine.head.class_range
    weight, state, rank0 = _reference_rows(reference, start, stop)
    assert torch.equal(engine.head.weight.detach(), weight), "centers differ after resharding"
    for key, value in state.items():
        assert torch.equal(engine.head_optimizer.state[key], value), f"optimizer state {key} differs"
    for mine, saved in zip(full_backbone(engine), rank0["backbone"]):
        assert torch.equal(mine, saved), "backbone differs after loading"
    assert engine.global_steps == steps and engine.head.sample_step == rank0["sample_step"]
    losses = _train(engine, 1, steps)
    return {"rows": stop - start, "loss": losses[0]}


def resume_continues_trajectory(ckpt, stage, optimizer, phase, steps=2, sample_rate=0.5):
    """phase "first": train 2, save, train 2 more (losses returned); phase "resume": load, train 2."""
    engine, _ = build(stage, optimizer, 2, MICRO, NUM_CLASSES, sample_rate=sample_rate)
    if phase == "first":
        _train(engine, steps, 0, gas=2)
        engine.save_checkpoint(ckpt)
    else:
        engine.load_checkpoint(ckpt)
    return _train(engine, steps, steps, gas=2)


def crash_during_save_keeps_previous(ckpt, stage=1):
    """A save that fails on one rank after DeepSpeed wrote its files raises everywhere and leaves
    ``latest`` on the previous, still loadable, checkpoint; so does a leftover staging directory and
    a crash between the two renames of a re-saved tag."""
    import ffc_parallel.checkpoint as ck

    engine, _ = build(stage, "sgd", 1, MICRO, NUM_CLASSES)
    _train(engine, 1, 0)
    good_tag = engine.save_checkpoint(ckpt)
    good_weight = engine.head.weight.detach().clone()
    _train(engine, 1, 1)
    original = ck.atomic_torch_save

    def failing(obj, path):
        if fp.get_rank() == fp.get_world_size() - 1:
            raise OSError("simulated disk failure")
        return original(obj, path)
    ck.atomic_torch_save = failing
    try:
        engine.save_checkpoint(ckpt)
        raise AssertionError("the failed save did not raise")
    except RuntimeError as exc:
        assert "failed on at least one rank" in str(exc)
    finally:
        ck.atomic_torch_save = original
    assert (Path(ckpt) / "latest").read_text() == good_tag
    assert not (Path(ckpt) / "global_step2").exists()
    engine.load_checkpoint(ckpt)
    assert torch.equal(engine.head.weight.detach(), good_weight) and engine.global_steps == 1
    # A crash between renaming the old copy of a re-saved tag away and the new one in.
    import torch.distributed as dist
    dist.barrier()  # every rank has finished reading the good checkpoint before rank 0 moves it
    if fp.get_rank() == 0:
        (Path(ckpt) / good_tag).rename(Path(ckpt) / f".trash-{good_tag}")
    dist.barrier()
    engine.load_checkpoint(ckpt)
    assert torch.equal(engine.head.weight.detach(), good_weight)
    return good_tag
