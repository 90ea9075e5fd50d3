"""Per-rank bodies of the checkpoint tests (run through ffc_parallel.testing.run_ranks), for both
routes of ``tests/cases_engine.py``: ``fp.save_checkpoint(engine, ...)`` / ``fp.load_checkpoint`` on
plain DeepSpeed's engine, ``engine.save_checkpoint`` / ``load_checkpoint`` on fp.initialize's."""
from pathlib import Path

import torch

import ffc_parallel as fp
from tests.cases_engine import backbone_of, build, ds_engine_of, full_backbone, global_batch, head_of, micro_slice

NUM_CLASSES, GLOBAL = 23, 12   # 12 samples a step whatever the world size (1, 2, 3, 4 ranks)


def _micro():
    return GLOBAL // fp.get_world_size()


def _train(engine, steps, first_step, gas=1):
    rank, world = fp.get_rank(), fp.get_world_size()
    micro = _micro() // gas
    losses = []
    for step in range(first_step, first_step + steps):
        x, y = global_batch(step, GLOBAL, NUM_CLASSES)
        for m in range(gas):
            loss = engine(micro_slice(x, m, rank, world, micro), micro_slice(y, m, rank, world, micro))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def _save(engine, route, ckpt, **kwargs):
    if route == "drop_in":
        return fp.save_checkpoint(engine, ckpt, **kwargs)
    return engine.save_checkpoint(ckpt, **kwargs)


def _load(engine, route, ckpt, **kwargs):
    if route == "drop_in":
        return fp.load_checkpoint(engine, ckpt, **kwargs)
    return engine.load_checkpoint(ckpt, **kwargs)


def backbone_optimizer_state(engine) -> list | None:
    """The backbone's full fp32 optimizer state (every key, every parameter), whatever the ZeRO stage."""
    from deepspeed.utils import safe_get_full_optimizer_state

    ds = ds_engine_of(engine)
    out = []
    for p in backbone_of(engine).parameters():
        if ds.zero_optimization_stage() == 0 and not ds.bfloat16_enabled():
            state = ds.optimizer.state[p]
            out.append({k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v) and v.dim()})
        else:
            out.append({k: safe_get_full_optimizer_state(p, k).detach().clone() for k in ("exp_avg", "exp_avg_sq")})
    return out


def save_after_training(ckpt, reference, route, stage, optimizer, steps=2, sample_rate=1.0, more=2):
    """Train ``steps`` steps, save; write an independent plain copy of this rank's centers, their
    optimizer state, the full backbone and its optimizer state for the loading side; then train
    ``more`` steps and return their losses (the uninterrupted trajectory)."""
    engine, _ = build(route, stage, optimizer, 1, _micro(), NUM_CLASSES, sample_rate=sample_rate)
    _train(engine, steps, 0)
    assert _save(engine, route, ckpt) is True
    head = head_of(engine)
    Path(reference).mkdir(exist_ok=True)
    torch.save({"class_range": head.class_range, "weight": head.weight.detach().clone(),
                "state": {k: v.clone() for k, v in head.centers.optimizer.state.items()},
                "backbone": full_backbone(engine), "backbone_state": backbone_optimizer_state(engine),
                "sample_step": head.sample_step}, Path(reference) / f"rank{fp.get_rank()}.pt")
    return _train(engine, more, steps)


def _reference_rows(reference, start, stop):
    parts = sorted(Path(reference).glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
    saved = [torch.load(p) for p in parts]
    saved.sort(key=lambda s: s["class_range"][0])
    weight = torch.cat([s["weight"] for s in saved])[start:stop]
    state = {k: torch.cat([s["state"][k] for s in saved])[start:stop] for k in saved[0]["state"]}
    return weight, state, saved[0]


def load_matches_saved(ckpt, reference, route, stage, optimizer, steps=2, more=2, backbone_state=True):
    """Load at this world size: centers and optimizer rows bit-identical to the saved ones, backbone
    and (``backbone_state``) its optimizer state equal, counters restored; then ``more`` steps run
    (their losses are returned, to compare with the uninterrupted run)."""
    engine, _ = build(route, stage, optimizer, 1, _micro(), NUM_CLASSES)
    _load(engine, route, ckpt)
    head = head_of(engine)
    start, stop = head.class_range
    weight, state, rank0 = _reference_rows(reference, start, stop)
    assert torch.equal(head.weight.detach(), weight), "centers differ after resharding"
    for key, value in state.items():
        assert torch.equal(head.centers.optimizer.state[key], value), f"optimizer state {key} differs"
    for mine, saved in zip(full_backbone(engine), rank0["backbone"]):
        assert torch.equal(mine, saved), "backbone differs after loading"
    if backbone_state:
        for i, (mine, saved) in enumerate(zip(backbone_optimizer_state(engine), rank0["backbone_state"])):
            for key, value in saved.items():
                assert torch.equal(mine[key], value), f"backbone optimizer state {key} of parameter {i} differs"
    assert ds_engine_of(engine).global_steps == steps and head.sample_step == rank0["sample_step"]
    return {"rows": stop - start, "losses": _train(engine, more, steps)}


def resume_continues_trajectory(ckpt, route, stage, optimizer, phase, steps=2, sample_rate=0.5):
    """phase "first": train 2, save, train 2 more (losses returned); phase "resume": load, train 2."""
    engine, _ = build(route, stage, optimizer, 2, _micro() // 2, NUM_CLASSES, sample_rate=sample_rate)
    if phase == "first":
        _train(engine, steps, 0, gas=2)
        _save(engine, route, ckpt)
    else:
        _load(engine, route, ckpt)
    return _train(engine, steps, steps, gas=2)


def crash_during_save_keeps_previous(ckpt, route="fp", stage=1):
    """A save that fails on one rank after DeepSpeed wrote its files raises everywhere and leaves
    ``latest`` on the previous, still loadable, checkpoint; so does a leftover staging directory and
    a crash between the two renames of a re-saved tag."""
    import torch.distributed as dist

    import ffc_parallel.checkpoint as ck

    engine, _ = build(route, stage, "sgd", 1, _micro(), NUM_CLASSES)
    head = head_of(engine)
    _train(engine, 1, 0)
    _save(engine, route, ckpt)
    good_tag = "global_step1"
    good_weight = head.weight.detach().clone()
    _train(engine, 1, 1)
    original = ck.atomic_torch_save

    def failing(obj, path):
        if fp.get_rank() == fp.get_world_size() - 1:
            raise OSError("simulated disk failure")
        return original(obj, path)
    ck.atomic_torch_save = failing
    try:
        _save(engine, route, ckpt)
        raise AssertionError("the failed save did not raise")
    except fp.CheckpointError as exc:
        assert f"rank {fp.get_world_size() - 1}: could not write" in str(exc) and "simulated disk failure" in str(exc)
        assert not (Path(ckpt) / ".staging-global_step2").exists()
    finally:
        ck.atomic_torch_save = original
    assert (Path(ckpt) / "latest").read_text() == good_tag
    assert not (Path(ckpt) / "global_step2").exists()
    _load(engine, route, ckpt)
    assert torch.equal(head.weight.detach(), good_weight) and ds_engine_of(engine).global_steps == 1
    # A crash between renaming the old copy of a re-saved tag away and the new one in.
    dist.barrier()  # every rank has finished reading the good checkpoint before rank 0 moves it
    if fp.get_rank() == 0:
        (Path(ckpt) / good_tag).rename(Path(ckpt) / f".trash-{good_tag}")
    dist.barrier()
    _load(engine, route, ckpt)
    assert torch.equal(head.weight.detach(), good_weight)
    return good_tag
