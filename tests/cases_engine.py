"""Per-rank bodies of the DeepSpeed tests (run through ffc_parallel.testing.run_ranks), for both routes:

* ``"drop_in"``: a user's own module holding ``fp.ShardedClassifier`` as its classifier, given to
  plain ``deepspeed.initialize(model=net, model_parameters=net.parameters(), config=...)``;
* ``"fp"``: ``fp.initialize(model=fp.HybridModel(backbone, head), config=...)``;
* ``"hybrid"``: ``fp.HybridModel`` under plain ``deepspeed.initialize``.

Every trajectory is compared with a dense single-process reference (``tests/reference.py``).
"""
import copy
import importlib

import torch

import ffc_parallel as fp
from ffc_parallel.heads.classifier import init_class_rows
from tests.reference import dense_margin_loss, rel_err

# DeepSpeed's CPU shared-memory all-reduce (used only by inference_all_reduce) is JIT-compiled under a
# file lock in ~/.cache/torch_extensions; rank processes killed mid-build by a test timeout leave that
# lock behind and every later DeepSpeed start on the machine waits forever. Training never uses it.
# (``import deepspeed.comm.torch as m`` would bind the torch package, an attribute of deepspeed.comm.)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

IN_DIM, DIM, SCALE, M3 = 6, 5, 16.0, 0.4   # cosface, s=16: smooth enough for tight trajectories
ROUTES = ("drop_in", "fp")


def make_backbone(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN_DIM, 12), torch.nn.Tanh(), torch.nn.Linear(12, DIM))


class Net(torch.nn.Module):
    """A user's model, DeepSpeedExamples style, with the head as its last layer."""

    def __init__(self, num_classes, sample_rate=1.0, head_dtype=None):
        super().__init__()
        self.features = make_backbone()
        self.classifier = fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE,
                                               sample_rate=sample_rate, dtype=head_dtype)

    def forward(self, x, labels=None):
        embeddings = self.features(x)
        return embeddings if labels is None else self.classifier(embeddings, labels)


def ds_config(stage, optimizer, gas, micro, world, dtype="fp32", clip=0.0, lr=0.1, extra=None, scheduler=False):
    """A DeepSpeed config; ``optimizer`` is "sgd" (momentum, weight decay) or "adamw" (torch's AdamW);
    ``scheduler``: DeepSpeed's WarmupDecayLR (linear warm-up over 2 steps, decay to 0 at step 6)."""
    if optimizer == "sgd":
        opt = {"type": "SGD", "params": {"lr": lr, "momentum": 0.9, "weight_decay": 1e-3}}
    else:
        opt = {"type": "AdamW", "params": {"lr": lr / 10, "betas": [0.9, 0.99], "eps": 1e-8,
                                           "weight_decay": 0.05, "torch_adam": True}}
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
              "train_batch_size": micro * gas * world, "optimizer": opt, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": clip,
              "wall_clock_breakdown": False}
    if scheduler:
        peak = opt["params"]["lr"]
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": peak / 4, "warmup_max_lr": peak, "warmup_num_steps": 2, "total_num_steps": 6,
            "warmup_type": "linear"}}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    config.update(extra or {})
    return config


def dense_optimizer(params, optimizer, lr=0.1):
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)
    return torch.optim.AdamW(params, lr=lr / 10, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def global_batch(step, size, num_classes):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, IN_DIM, generator=g), torch.randint(num_classes, (size,), generator=g)


def micro_slice(tensor, micro, rank, world, b):
    start = micro * world * b + rank * b
    return tensor[start: start + b]


def ds_engine_of(engine):
    return getattr(engine, "deepspeed", engine)


def head_of(engine):
    return next(m for m in ds_engine_of(engine).module.modules() if isinstance(m, fp.ShardedClassifier))


def backbone_of(engine):
    module = ds_engine_of(engine).module
    return module.features if isinstance(module, Net) else module.backbone


def full_backbone(engine):
    """The backbone's full fp32 (master) parameters, whatever the ZeRO stage."""
    from deepspeed.utils import safe_get_full_fp32_param
    full = [(safe_get_full_fp32_param(p), p) for p in backbone_of(engine).parameters()]
    return [(master if master is not None else p).detach().float().clone() for master, p in full]


def build(route, stage, optimizer, gas, micro, num_classes, dtype="fp32", clip=0.0, sample_rate=1.0,
          scheduler=False, head_dtype=None, extra=None, model_parameters="net"):
    """``(engine, dense reference backbone)``: the engine of ``route`` (see the module docstring)."""
    import deepspeed

    world = fp.get_world_size()
    config = ds_config(stage, optimizer, gas, micro, world, dtype, clip, extra=extra, scheduler=scheduler)
    if route == "drop_in":
        net = Net(num_classes, sample_rate, head_dtype)
        reference = copy.deepcopy(net.features)
        engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
        return engine, reference
    if route == "hybrid":   # fp.HybridModel under plain deepspeed.initialize
        model = fp.HybridModel(make_backbone(), fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE,
                                                                     sample_rate=sample_rate, dtype=head_dtype))
        reference = copy.deepcopy(model.backbone)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        return engine, reference
    backbone = make_backbone()
    reference = copy.deepcopy(backbone)
    head = fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE, sample_rate=sample_rate,
                                dtype=head_dtype)
    model = fp.HybridModel(backbone, head)
    params = model.parameters() if model_parameters == "net" else None   # as DeepSpeed's examples pass it, or default
    engine, *_ = fp.initialize(model=model, config=config, model_parameters=params)
    return engine, reference


def _train_step(engine, x, y, gas, micro, in_dtype=torch.float32):
    rank, world = fp.get_rank(), fp.get_world_size()
    losses = []
    for m in range(gas):
        loss = engine(micro_slice(x, m, rank, world, micro).to(in_dtype), micro_slice(y, m, rank, world, micro))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return sum(losses) / gas


def trajectories_match_dense(configs, num_classes=11, micro=3, steps=3):
    """Each config ``{route, stage, optimizer, gas, dtype[, clip, scheduler, model_parameters]}`` follows
    the dense single-process trajectory (with ``clip``: backbone and all centers clipped to that global
    norm; with ``scheduler``: DeepSpeed's learning-rate schedule)."""
    rank, world = fp.get_rank(), fp.get_world_size()
    report = {}
    for c in configs:
        route, stage, optimizer, gas, dtype = c["route"], c["stage"], c["optimizer"], c["gas"], c["dtype"]
        clip = c.get("clip", 0.0)
        # Adam divides by sqrt(v): rounding differences of tiny gradient entries are amplified.
        tol = (1e-5 if optimizer == "sgd" else 5e-5) if dtype == "fp32" else 3e-2
        engine, ref_bb = build(route, stage, optimizer, gas, micro, num_classes, dtype, clip,
                               scheduler=c.get("scheduler", False), model_parameters=c.get("model_parameters", "net"))
        ref_w = torch.nn.Parameter(init_class_rows(0, num_classes, DIM, 0.01, 0))
        ref_opt = dense_optimizer(list(ref_bb.parameters()) + [ref_w], optimizer)
        in_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        worst, lrs = 0.0, []
        for step in range(steps):
            lr = ds_engine_of(engine).get_lr()[0]   # the scheduled rate of this step
            lrs.append(lr)
            for group in ref_opt.param_groups:
                group["lr"] = lr
            x, y = global_batch(step, micro * gas * world, num_classes)
            loss = _train_step(engine, x, y, gas, micro, in_dtype)
            ref_opt.zero_grad()
            ref_loss = dense_margin_loss(ref_bb(x), ref_w, y, SCALE, 1.0, 0.0, M3)
            ref_loss.backward()
            if clip:
                norm = torch.nn.utils.clip_grad_norm_(list(ref_bb.parameters()) + [ref_w], clip)
                assert norm > 2 * clip, f"clipping inactive (norm {float(norm)}): lower the clip"
            ref_opt.step()
            err = abs(loss - float(ref_loss)) / abs(float(ref_loss))
            assert err < tol, f"config {c} step {step}: loss {loss} vs dense {float(ref_loss)}"
            worst = max(worst, err)
        head = head_of(engine)
        start, stop = head.class_range
        errs = {"centers": rel_err(head.weight.detach().float(), ref_w.detach()[start:stop])}
        for i, (p, q) in enumerate(zip(full_backbone(engine), ref_bb.parameters())):
            errs[f"backbone{i}"] = rel_err(p, q.detach())
        bad = {k: v for k, v in errs.items() if not v < tol}
        assert not bad, f"rank {rank}/{world} config {c}: {bad}"
        assert ds_engine_of(engine).global_steps == steps
        if c.get("scheduler"):
            assert len(set(lrs)) > 1, f"the schedule did not move the learning rate: {lrs}"
        key = "/".join(str(c[k]) for k in ("route", "stage", "optimizer", "gas", "dtype"))
        report[key + (f"/clip{clip}" if clip else "") + ("/sched" if c.get("scheduler") else "")] = \
            max([worst] + list(errs.values()))
    return report


def partial_fc_touches_only_sampled_rows(route="fp", stage=1, optimizer="adamw", gas=2, num_classes=40, micro=2):
    """With Partial FC, rows outside the union of the micro-batches' samples keep weights and state."""
    engine, _ = build(route, stage, optimizer, gas, micro, num_classes, sample_rate=0.25)
    world, rank = fp.get_world_size(), fp.get_rank()
    head = head_of(engine)
    for step in range(2):
        before = head.weight.detach().clone()
        x, y = global_batch(step, micro * gas * world, num_classes)
        used = []
        for m in range(gas):
            loss = engine(micro_slice(x, m, rank, world, micro), micro_slice(y, m, rank, world, micro))
            used.append(head.last_sampled_rows.clone())
            if m == 0:   # the centers' optimizer exists from the engine's first forward on
                state_before = {k: v.clone() for k, v in head.centers.optimizer.state.items()}
            engine.backward(loss)
            engine.step()
        touched = torch.zeros(head.num_local, dtype=torch.bool)
        touched[torch.cat(used)] = True
        assert touched.sum() < head.num_local, "every row sampled: the test needs a lower sample rate"
        assert torch.equal(head.weight[~touched], before[~touched]), "an unsampled row moved"
        assert not torch.equal(head.weight[touched], before[touched]), "no sampled row moved"
        for key, value in head.centers.optimizer.state.items():
            assert torch.equal(value[~touched], state_before[key][~touched]), f"state {key} of an unsampled row changed"
        assert torch.equal(head.centers.optimizer.state["step"][touched], state_before["step"][touched] + 1)
    return int(touched.sum())


def _allow_fp16_on_cpu():
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True
    if torch.float16 not in accelerator.supported_dtypes():
        supported = accelerator.supported_dtypes()
        accelerator.supported_dtypes = lambda: supported + [torch.float16]


def fp16_at_zero_stage_0_is_refused(route):
    _allow_fp16_on_cpu()
    try:
        engine, _ = build(route, 0, "sgd", 1, 2, 5, extra={"fp16": {"enabled": True}})
        x, y = global_batch(0, 2 * fp.get_world_size(), 5)
        engine(micro_slice(x, 0, fp.get_rank(), fp.get_world_size(), 2).half(),
               micro_slice(y, 0, fp.get_rank(), fp.get_world_size(), 2))
    except ValueError as exc:
        return str(exc)
    return None


def fp16_overflow_on_one_rank_skips_everywhere(route, stage, num_classes=11, micro=2):
    """DeepSpeed's real fp16 path on CPU (its capability check patched: the CPU accelerator refuses
    fp16 only by policy), fp16 centers: at step 1 one center row of the LAST rank is shrunk to a
    tiny norm, so that rank's center gradient overflows fp16 (s / |w| is huge) while every
    embedding gradient stays finite. Every rank must skip the step (backbone and centers unchanged)
    and halve the one loss scale; the scale doubles back after ``loss_scale_window`` clean steps; the
    applied steps follow dense fp32 training loosely."""
    _allow_fp16_on_cpu()
    rank, world = fp.get_rank(), fp.get_world_size()
    extra = {"fp16": {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 2, "hysteresis": 1,
                      "min_loss_scale": 1}}
    engine, reference_backbone = build(route, stage, "sgd", 1, micro, num_classes, head_dtype=torch.float16,
                                       extra=extra)
    head, ds = head_of(engine), ds_engine_of(engine)
    ref_w = torch.nn.Parameter(init_class_rows(0, num_classes, DIM, 0.01, 0))
    ref_opt = dense_optimizer(list(reference_backbone.parameters()) + [ref_w], "sgd")
    scale = lambda: float(ds.optimizer.loss_scale)  # noqa: E731
    scales, applied, errors, bb_errors = [scale()], [], [], []
    for step in range(5):
        x, y = global_batch(step, micro * world, num_classes)
        centers = head.weight.detach().clone()
        inject = step == 1
        if inject and rank == world - 1:
            with torch.no_grad():
                head.weight[0] *= 1e-4          # |w| ~ 1e-6: its gradient (s / |w|) G.x overflows fp16
        loss = engine(micro_slice(x, 0, rank, world, micro).half(), micro_slice(y, 0, rank, world, micro))
        engine.backward(loss)
        engine.step()
        if inject and rank == world - 1:
            with torch.no_grad():
                head.weight.copy_(centers)
        moved = not torch.equal(head.weight.detach(), centers)
        applied.append(ds.was_step_applied())
        assert moved == applied[-1], f"step {step}: centers moved={moved} but step applied={applied[-1]}"
        scales.append(scale())
        if not inject:  # the dense fp32 reference takes the same (unskipped) steps
            ref_opt.zero_grad()
            dense_margin_loss(reference_backbone(x), ref_w, y, SCALE, 1.0, 0.0, M3).backward()
            ref_opt.step()
        start, stop = head.class_range
        errors.append(rel_err(head.weight.detach().float(), ref_w.detach()[start:stop]))
        bb_errors.append(max(rel_err(p, q.detach()) for p, q in zip(full_backbone(engine), reference_backbone.parameters())))
    assert max(errors) < 5e-3 and max(bb_errors) < 3e-2, f"fp16 off the fp32 reference: {errors}, {bb_errors}"
    assert applied == [True, False, True, True, True], applied
    # DeepSpeed's rule: halve on the overflow; double again once loss_scale_window (2) steps were clean
    # (0.19 counts the window from the step after the overflow, 0.16 from the overflow itself).
    assert scales[:4] == [16.0, 16.0, 8.0, 8.0] and scales[-1] == 16.0, scales
    assert scales in ([16.0, 16.0, 8.0, 8.0, 8.0, 16.0], [16.0, 16.0, 8.0, 8.0, 16.0, 16.0]), scales
    assert ds.skipped_steps == 1
    return scales


def loss_fn_trajectories_match_dense(num_classes=11, micro=3, steps=3, xbm_size=8, seed=5):
    """``HybridModel(loss_fn=...)`` under fp.initialize on W ranks follows the dense one-process
    trajectory for input mixup (two head calls, per-rank partners) and head + cross-batch memory;
    with Partial FC, the rows of BOTH mixup head calls are stepped."""
    import torch.distributed as dist

    from ffc_parallel.algorithms import StepLoss
    from ffc_parallel.distributed import streams

    rank, world = fp.get_rank(), fp.get_world_size()
    own_group = [dist.new_group([r]) for r in range(world)][rank]   # a one-rank world for the reference
    report = {}
    for case in ("mixup", "xbm"):
        backbone = make_backbone()
        ref_bb = copy.deepcopy(backbone)
        head = fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE)
        mixup = fp.algorithms.Mixup(alpha=0.7, seed=seed) if case == "mixup" else None
        xbm = fp.losses.CrossBatchMemory(xbm_size, DIM, warmup_steps=1) if case == "xbm" else None
        ref_xbm = fp.losses.CrossBatchMemory(xbm_size, DIM, warmup_steps=1, group=own_group) if xbm else None
        loss_fn = StepLoss(mixup=mixup, xbm=xbm)
        engine, *_ = fp.initialize(model=fp.HybridModel(backbone, head, loss_fn=loss_fn),
                                   config=ds_config(1, "sgd", 1, micro, world))
        ref_w = torch.nn.Parameter(init_class_rows(0, num_classes, DIM, 0.01, 0))
        ref_opt = dense_optimizer(list(ref_bb.parameters()) + [ref_w], "sgd")
        for step in range(steps):
            x, y = global_batch(step, micro * world, num_classes)
            loss_fn.step = step
            loss = engine(micro_slice(x, 0, rank, world, micro), micro_slice(y, 0, rank, world, micro))
            engine.backward(loss)
            engine.step()
            ref_opt.zero_grad()
            if mixup is not None:   # λ from (seed, step); partners: a permutation of each rank's own batch
                lam = float(streams.numpy_generator(seed, "mixup", step).beta(0.7, 0.7))
                perm = torch.cat([torch.randperm(micro, generator=streams.generator(seed, "mixup_partners", r, step)) + r * micro
                                  for r in range(world)])
                emb = ref_bb(lam * x + (1 - lam) * x[perm])
                ref_loss = lam * dense_margin_loss(emb, ref_w, y, SCALE, 1.0, 0.0, M3) + \
                    (1 - lam) * dense_margin_loss(emb, ref_w, y[perm], SCALE, 1.0, 0.0, M3)
            else:
                emb = ref_bb(x)
                ref_loss = dense_margin_loss(emb, ref_w, y, SCALE, 1.0, 0.0, M3) + ref_xbm(emb, y)
            ref_loss.backward()
            ref_opt.step()
            assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item()), (case, step, loss.item(), ref_loss.item())
        start, stop = head.class_range
        errs = {"centers": rel_err(head.weight.detach(), ref_w.detach()[start:stop])}
        errs.update({f"backbone{i}": rel_err(p, q.detach()) for i, (p, q) in
                     enumerate(zip(full_backbone(engine), ref_bb.parameters()))})
        assert max(errs.values()) < 1e-5, (case, errs)
        report[case] = max(errs.values())

    # Partial FC: a mixup step's two head calls draw different rows; both sets are stepped.
    head = fp.ShardedClassifier(DIM, 200, margin="cosface", scale=SCALE, sample_rate=0.1)
    loss_fn = StepLoss(mixup=fp.algorithms.Mixup(alpha=0.7, seed=seed))
    engine, *_ = fp.initialize(model=fp.HybridModel(make_backbone(), head, loss_fn=loss_fn),
                               config=ds_config(1, "sgd", 1, micro, world))
    calls = []
    note_rows = head.centers.note_rows
    head.centers.note_rows = lambda rows: (calls.append(rows.clone()), note_rows(rows))
    before = head.weight.detach().clone()
    x, y = global_batch(0, micro * world, 200)
    engine.backward(engine(micro_slice(x, 0, rank, world, micro), micro_slice(y, 0, rank, world, micro)))
    engine.step()
    assert len(calls) == 2
    first_only = calls[0][~torch.isin(calls[0], calls[1])]
    assert first_only.numel() > 0, "the two draws coincide: change the seed"
    moved = (head.weight.detach() != before).any(1)
    assert moved[first_only].all(), "rows drawn only by the first head call were not stepped"
    union = torch.zeros(head.num_local, dtype=torch.bool)
    union[torch.cat(calls)] = True
    assert not moved[~union].any(), "a row drawn by neither call moved"
    assert head.weight.grad is None or not head.weight.grad.any(), "gradient left behind for the next step"
    report["partial_fc_rows"] = int(union.sum())
    return report


def fp_engine_mirrors_deepspeed_api(ckpt, num_classes=11, micro=3):
    """fp.initialize's engine takes DeepSpeed's arguments and keywords and returns what DeepSpeed does:
    the config from ``args.deepspeed_config`` alone (bing_bert style), ``save_checkpoint(dir, tag,
    save_latest=False)`` -> True, ``load_checkpoint(..., load_module_strict=, load_module_only=)``,
    ``engine.eval(); engine(x)`` -> embeddings. Returns what the test checks."""
    import argparse
    import json
    from pathlib import Path

    import deepspeed

    rank, world = fp.get_rank(), fp.get_world_size()
    path = Path(ckpt) / "ds.json"
    if rank == 0:
        Path(ckpt).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ds_config(1, "adamw", 1, micro, world)))
    torch.distributed.barrier()
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    head = fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE)
    engine, *_ = fp.initialize(args=args, model=fp.HybridModel(make_backbone(), head))
    x, y = global_batch(0, micro * world, num_classes)
    loss = _train_step(engine, x, y, 1, micro)
    both = None
    try:
        fp.initialize(args=args, model=fp.HybridModel(make_backbone(), fp.ShardedClassifier(DIM, 3)), config=str(path))
    except ValueError as exc:
        both = str(exc)
    saved = engine.save_checkpoint(ckpt, "first", save_latest=False)
    latest_written = (Path(ckpt) / "latest").exists()
    engine.eval()
    embeddings = engine(micro_slice(x, 0, rank, world, micro))
    engine.train()
    _train_step(engine, x, y, 1, micro)
    state_now = head.centers.optimizer.state["exp_avg"].clone()
    path_loaded, client = engine.load_checkpoint(ckpt, "first", load_module_strict=True, load_module_only=True)
    centers_restored = bool(torch.equal(head.weight, torch.load(Path(ckpt) / "first" / "ffc_shards" / "head" /
                                                                f"shard_{rank:05d}.pt")["weight"]))
    kept_state = torch.equal(head.centers.optimizer.state["exp_avg"], state_now)   # module only, as DeepSpeed
    return {"loss": loss, "both": both, "saved": saved, "latest_written": latest_written,
            "embedding_shape": list(embeddings.shape), "centers_restored": centers_restored,
            "module_only_kept_optimizer_state": bool(kept_state), "loaded_path": str(path_loaded)}
