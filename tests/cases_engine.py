"""Per-rank bodies of the DeepSpeed engine tests (run through ffc_parallel.testing.run_ranks)."""
import copy
import importlib

import torch

import ffc_parallel as fp
from ffc_parallel.heads.sharded import init_class_rows
from tests.reference import dense_margin_loss, rel_err

# DeepSpeed's CPU shared-memory all-reduce (used only by inference_all_reduce) is JIT-compiled under a
# file lock in ~/.cache/torch_extensions; rank processes killed mid-build by a test timeout leave that
# lock behind and every later DeepSpeed start on the machine waits forever. Training never uses it.
# (``import deepspeed.comm.torch as m`` would bind the torch package, an attribute of deepspeed.comm.)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

IN_DIM, DIM, SCALE, M3 = 6, 5, 16.0, 0.4   # cosface, s=16: smooth enough for tight trajectories


def make_backbone(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN_DIM, 12), torch.nn.Tanh(), torch.nn.Linear(12, DIM))


def ds_config(stage, optimizer, gas, micro, world, dtype="fp32", clip=0.0, lr=0.1, extra=None):
    """A DeepSpeed config; ``optimizer`` is "sgd" (momentum, weight decay) or "adamw" (torch's AdamW)."""
    if optimizer == "sgd":
        opt = {"type": "SGD", "params": {"lr": lr, "momentum": 0.9, "weight_decay": 1e-3}}
    else:
        opt = {"type": "AdamW", "params": {"lr": lr / 10, "betas": [0.9, 0.99], "eps": 1e-8,
                                           "weight_decay": 0.05, "torch_adam": True}}
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
              "train_batch_size": micro * gas * world, "optimizer": opt, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "gradient_clipping": clip,
              "wall_clock_breakdown": False}
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


def full_backbone(engine):
    """The backbone's full fp32 (master) parameters, whatever the ZeRO stage."""
    from deepspeed.utils import safe_get_full_fp32_param
    full = [(safe_get_full_fp32_param(p), p) for p in engine.module.backbone.parameters()]
    return [(master if master is not None else p).detach().float().clone() for master, p in full]


def build(stage, optimizer, gas, micro, num_classes, dtype="fp32", clip=0.0, sample_rate=1.0):
    world = fp.get_world_size()
    backbone = make_backbone()
    reference_backbone = copy.deepcopy(backbone)
    head = fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE, sample_rate=sample_rate)
    model = fp.HybridModel(backbone, head)
    engine, *_ = fp.initialize(model=model, config=ds_config(stage, optimizer, gas, micro, world, dtype, clip))
    return engine, reference_backbone


def trajectories_match_dense(configs, num_classes=11, micro=3, steps=3):
    """Each config ``[stage, optimizer, gas, dtype(, clip)]`` follows the dense single-process
    trajectory (with ``clip``: gradients clipped to that global norm, backbone and all centers)."""
    rank, world = fp.get_rank(), fp.get_world_size()
    report = {}
    for stage, optimizer, gas, dtype, *clip in configs:
        clip = clip[0] if clip else 0.0
        # Adam divides by sqrt(v): rounding differences of tiny gradient entries are amplified.
        tol = (1e-5 if optimizer == "sgd" else 5e-5) if dtype == "fp32" else 3e-2
        engine, ref_bb = build(stage, optimizer, gas, micro, num_classes, dtype, clip)
        ref_w = torch.nn.Parameter(init_class_rows(0, num_classes, DIM, 0.01, 0))
        ref_opt = dense_optimizer(list(ref_bb.parameters()) + [ref_w], optimizer)
        in_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        worst = 0.0
        for step in range(steps):
            x, y = global_batch(step, micro * gas * world, num_classes)
            losses = []
            for m in range(gas):
                loss = engine(micro_slice(x, m, rank, world, micro).to(in_dtype), micro_slice(y, m, rank, world, micro))
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            ref_opt.zero_grad()
            ref_loss = dense_margin_loss(ref_bb(x), ref_w, y, SCALE, 1.0, 0.0, M3)
            ref_loss.backward()
            if clip:
                norm = torch.nn.utils.clip_grad_norm_(list(ref_bb.parameters()) + [ref_w], clip)
                assert norm > 2 * clip, f"clipping inactive (norm {float(norm)}): lower the clip"
            ref_opt.step()
            err = abs(sum(losses) / gas - float(ref_loss)) / abs(float(ref_loss))
            assert err < tol, f"config {stage, optimizer, gas, dtype} step {step}: loss err {err}"
            worst = max(worst, err)
        start, stop = engine.head.class_range
        errs = {"centers": rel_err(engine.head.weight.detach().float(), ref_w.detach()[start:stop])}
        for i, (p, q) in enumerate(zip(full_backbone(engine), ref_bb.parameters())):
            errs[f"backbone{i}"] = rel_err(p, q.detach())
        bad = {k: v for k, v in errs.items() if not v < tol}
        assert not bad, f"rank {rank}/{world} config {stage, optimizer, gas, dtype}: {bad}"
        assert engine.global_steps == steps
        report[f"{stage}/{optimizer}/{gas}/{dtype}" + (f"/clip{clip}" if clip else "")] = max([worst] + list(errs.values()))
    return report


def partial_fc_touches_only_sampled_rows(stage=1, optimizer="adamw", gas=2, num_classes=40, micro=2):
    """With Partial FC, rows outside the union of the micro-batches' samples keep weights and state."""
    engine, _ = build(stage, optimizer, gas, micro, num_classes, sample_rate=0.25)
    world, rank = fp.get_world_size(), fp.get_rank()
    head, opt = engine.head, engine.head_optimizer
    for step in range(2):
        before = head.weight.detach().clone()
        state_before = {k: v.clone() for k, v in opt.state.items()}
        x, y = global_batch(step, micro * gas * world, num_classes)
        used = []
        for m in range(gas):
            loss = engine(micro_slice(x, m, rank, world, micro), micro_slice(y, m, rank, world, micro))
            used.append(head.last_sampled_rows.clone())
            engine.backward(loss)
            engine.step()
        touched = torch.zeros(head.num_local, dtype=torch.bool)
        touched[torch.cat(used)] = True
        assert touched.sum() < head.num_local, "every row sampled: the test needs a lower sample rate"
        assert torch.equal(head.weight[~touched], before[~touched]), "an unsampled row moved"
        assert not torch.equal(head.weight[touched], before[touched]), "no sampled row moved"
        for key, value in opt.state.items():
            assert torch.equal(value[~touched], state_before[key][~touched]), f"state {key} of an unsampled row changed"
        assert torch.equal(opt.state["step"][touched], state_before["step"][touched] + 1)
    return int(touched.sum())


def raw_deepspeed_initialize(num_classes=9):
    """deepspeed.initialize on a HybridModel: refused on > 1 rank, naming fp.initialize; fine on 1."""
    import deepspeed

    world = fp.get_world_size()
    backbone = make_backbone()
    head = fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE)
    model = fp.HybridModel(backbone, head)
    x, y = global_batch(0, 2 * world, num_classes)
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(0, "sgd", 1, 2, world))
        loss = engine(micro_slice(x, 0, fp.get_rank(), world, 2), micro_slice(y, 0, fp.get_rank(), world, 2))
    except RuntimeError as exc:
        return str(exc)
    engine.backward(loss)
    engine.step()
    return None


def _allow_fp16_on_cpu():
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True
    if torch.float16 not in accelerator.supported_dtypes():
        supported = accelerator.supported_dtypes()
        accelerator.supported_dtypes = lambda: supported + [torch.float16]


def fp16_at_zero_stage_0_is_refused():
    _allow_fp16_on_cpu()
    config = ds_config(0, "sgd", 1, 2, fp.get_world_size(), extra={"fp16": {"enabled": True}})
    head = fp.ShardedClassifier(DIM, 5, margin="cosface", scale=SCALE)
    try:
        fp.initialize(model=fp.HybridModel(make_backbone(), head), config=config)
    except ValueError as exc:
        return str(exc)
    return None


def fp16_overflow_on_one_rank_skips_everywhere(stage, num_classes=11, micro=2):
    """DeepSpeed's real fp16 path on CPU (its capability check patched: the CPU accelerator refuses
    fp16 only by policy): an inf injected into the LAST rank's center gradient makes every rank skip
    the step (backbone and centers unchanged) and halve the one loss scale; the scale doubles back
    after ``loss_scale_window`` clean steps; the applied steps follow dense fp32 training loosely."""
    _allow_fp16_on_cpu()
    rank, world = fp.get_rank(), fp.get_world_size()
    backbone = make_backbone()
    head = fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE)
    config = ds_config(stage, "sgd", 1, micro, world, extra={"fp16": {
        "enabled": True, "initial_scale_power": 4, "loss_scale_window": 2, "hysteresis": 1, "min_loss_scale": 1}})
    reference_backbone = copy.deepcopy(backbone)
    engine, *_ = fp.initialize(model=fp.HybridModel(backbone, head), config=config)
    ref_w = torch.nn.Parameter(init_class_rows(0, num_classes, DIM, 0.01, 0))
    ref_opt = dense_optimizer(list(reference_backbone.parameters()) + [ref_w], "sgd")
    scales, applied, errors, bb_errors = [engine.loss_scale], [], [], []
    for step in range(5):
        x, y = global_batch(step, micro * world, num_classes)
        centers = engine.head.weight.detach().clone()
        loss = engine(micro_slice(x, 0, rank, world, micro).half(), micro_slice(y, 0, rank, world, micro))
        engine.backward(loss)
        inject = step == 1
        if inject and rank == world - 1:
            engine.head.weight.grad[0, 0] = float("inf")
        engine.step()
        moved = not torch.equal(engine.head.weight.detach(), centers)
        applied.append(engine.deepspeed.was_step_applied())
        assert moved == applied[-1], f"step {step}: centers moved={moved} but step applied={applied[-1]}"
        scales.append(engine.loss_scale)
        if not inject:  # the dense fp32 reference takes the same (unskipped) steps
            ref_opt.zero_grad()
            dense_margin_loss(reference_backbone(x), ref_w, y, SCALE, 1.0, 0.0, M3).backward()
            ref_opt.step()
        start, stop = engine.head.class_range
        errors.append(rel_err(engine.head.weight.detach(), ref_w.detach()[start:stop]))
        bb_errors.append(max(rel_err(p, q.detach()) for p, q in zip(full_backbone(engine), reference_backbone.parameters())))
    assert max(errors) < 5e-3 and max(bb_errors) < 3e-2, f"fp16 off the fp32 reference: {errors}, {bb_errors}"
    assert applied == [True, False, True, True, True], applied
    # DeepSpeed's rule: halve on overflow; double once loss_scale_window (2) steps after the overflow were clean.
    assert scales == [16.0, 16.0, 8.0, 8.0, 8.0, 16.0], scales
    assert engine.skipped_steps == 1
    return scales


def loss_fn_trajectories_match_dense(num_classes=11, micro=3, steps=3, xbm_size=8, seed=5):
    """``HybridModel(loss_fn=...)`` under fp.initialize on W ranks follows the dense one-process
    trajectory for input mixup (two head calls, per-rank partners) and head + cross-batch memory;
    with Partial FC, the rows of BOTH mixup head calls are stepped."""
    import numpy as np
    import torch.distributed as dist

    from ffc_parallel.cli.recipe import StepLoss
    from ffc_parallel.heads.sampling import step_generator

    rank, world = fp.get_rank(), fp.get_world_size()
    own_group = [dist.new_group([r]) for r in range(world)][rank]   # a one-rank world for the reference
    report = {}
    for case in ("mixup", "xbm"):
        backbone = make_backbone()
        ref_bb = copy.deepcopy(backbone)
        head = fp.ShardedClassifier(DIM, num_classes, margin="cosface", scale=SCALE)
        mixup = fp.data.Mixup(alpha=0.7, seed=seed) if case == "mixup" else None
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
                lam = float(np.random.default_rng([seed, step]).beta(0.7, 0.7))
                perm = torch.cat([torch.randperm(micro, generator=step_generator(seed, r + 1, step)) + r * micro
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
    loss_fn = StepLoss(mixup=fp.data.Mixup(alpha=0.7, seed=seed))
    engine, *_ = fp.initialize(model=fp.HybridModel(make_backbone(), head, loss_fn=loss_fn),
                               config=ds_config(1, "sgd", 1, micro, world))
    calls = []
    listener = head.rows_listener
    head.rows_listener = lambda rows: (calls.append(rows.clone()), listener(rows))
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
