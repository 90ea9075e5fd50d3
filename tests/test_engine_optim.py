"""The row-sparse sharded center optimizers against torch.optim (one process, no DeepSpeed)."""
import pytest
import torch

from ffc_parallel.optim import ShardedCenterOptimizer
from ffc_parallel.optim.center_optimizer import _fused_kernel_exists

CASES = {
    "sgd": (dict(kind="sgd", lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_momentum_wd": (dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, dampening=0.1),
                        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, dampening=0.1)),
    "sgd_nesterov": (dict(kind="sgd", lr=0.05, momentum=0.8, nesterov=True),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True)),
    "adam_l2": (dict(kind="adam", lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
                lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)),
    "adamw": (dict(kind="adamw", lr=0.01, weight_decay=0.1, eps=1e-6),
              lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, eps=1e-6)),
}


def _grads(steps, rows, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize("name", list(CASES))
def test_all_rows_equals_torch_optimizer(name):
    ours_kwargs, make_torch = CASES[name]
    w0 = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, ref_opt = ShardedCenterOptimizer(ours, **ours_kwargs), make_torch([ref])
    for grad in _grads(5, 7, 4):
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step(None)
        ref_opt.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(CASES))
def test_touched_rows_follow_their_own_optimizer_untouched_rows_frozen(name):
    """Lazy semantics: each row behaves as if it had its own torch optimizer, stepped only when touched."""
    ours_kwargs, make_torch = CASES[name]
    n, dim = 9, 3
    w0 = torch.randn(n, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = torch.nn.Parameter(w0.clone())
    opt = ShardedCenterOptimizer(ours, **ours_kwargs)
    per_row = [torch.nn.Parameter(w0[i].clone()) for i in range(n)]
    per_row_opts = [make_torch([p]) for p in per_row]
    g = torch.Generator().manual_seed(3)
    for grad in _grads(6, n, dim, seed=4):
        rows = torch.randperm(n, generator=g)[: int(torch.randint(1, n, (1,), generator=g))].sort().values
        frozen = ours.detach().clone()
        ours.grad = torch.zeros_like(grad)
        ours.grad[rows] = grad[rows] * 4.0          # scaled gradient, unscaled by grad_scale below
        opt.step(rows, grad_scale=0.25)
        for i in rows.tolist():
            per_row[i].grad = grad[i].clone()
            per_row_opts[i].step()
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(ours.detach()[untouched], frozen[untouched])
        torch.testing.assert_close(ours.detach(), torch.stack([p.detach() for p in per_row]), rtol=1e-12, atol=1e-14)


def test_low_precision_centers_keep_fp32_state():
    w = torch.nn.Parameter(torch.randn(5, 4).to(torch.bfloat16))
    opt = ShardedCenterOptimizer(w, "adamw", lr=0.01)
    w.grad = torch.randn(5, 4).to(torch.bfloat16)
    opt.step(torch.tensor([1, 3]))
    assert opt.state["exp_avg"].dtype == torch.float32 and w.dtype == torch.bfloat16
    assert opt.state["step"].tolist() == [0, 1, 0, 1, 0]


def test_center_settings_follow_the_optimizer_deepspeed_built():
    from ffc_parallel.deepspeed_bridge import CenterSettings

    p = [torch.nn.Parameter(torch.zeros(3, 2))]
    sgd = CenterSettings(torch.optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-4))
    assert (sgd.kind, sgd.lr, sgd.hyper) == ("sgd", 0.2, {"momentum": 0.9, "dampening": 0.0, "nesterov": True,
                                                           "weight_decay": 1e-4})
    adam = CenterSettings(torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1))
    assert (adam.kind, adam.hyper) == ("adam", {"betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1})
    assert CenterSettings(torch.optim.AdamW(p, lr=0.1)).kind == "adamw"

    class FusedAdam(torch.optim.Optimizer):   # DeepSpeed's fused Adam is told apart by its mode, as DeepSpeed's is
        def __init__(self, params, adam_w_mode):
            super().__init__(params, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True))
            self.adam_w_mode = adam_w_mode
    assert CenterSettings(FusedAdam(p, True)).kind == "adamw" and CenterSettings(FusedAdam(p, False)).kind == "adam"
    with pytest.raises(ValueError, match="can follow SGD, Adam and AdamW"):
        CenterSettings(torch.optim.RMSprop(p, lr=0.1))
    with pytest.raises(ValueError, match="amsgrad"):
        CenterSettings(torch.optim.Adam(p, lr=0.1, amsgrad=True))


def test_follow_takes_new_hyperparameters_but_refuses_a_new_rule():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    opt = ShardedCenterOptimizer(w, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt.follow("sgd", {"momentum": 0.8, "weight_decay": 0.0})
    assert (opt.momentum, opt.weight_decay) == (0.8, 0.0)
    with pytest.raises(ValueError, match="changed from sgd"):
        opt.follow("adamw", {})
    with pytest.raises(ValueError, match="changed from sgd"):
        opt.follow("sgd", {"momentum": 0.0})


def test_state_dict_round_trip_and_mismatch_error():
    w = torch.nn.Parameter(torch.randn(4, 2))
    opt = ShardedCenterOptimizer(w, "sgd", lr=0.1, momentum=0.5)
    w.grad = torch.ones(4, 2)
    opt.step(None)
    other = ShardedCenterOptimizer(torch.nn.Parameter(torch.randn(4, 2)), "sgd", lr=0.3, momentum=0.5)
    other.load_state_dict(opt.state_dict())
    assert torch.equal(other.state["momentum_buffer"], opt.state["momentum_buffer"]) and other.lr == 0.1
    with pytest.raises(ValueError, match="does not match"):
        ShardedCenterOptimizer(torch.nn.Parameter(torch.randn(5, 2)), "sgd", momentum=0.5).load_state_dict(opt.state_dict())


def test_every_shipped_deepspeed_config_is_documented_and_has_an_optimizer_the_centers_follow():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "deepspeed_configs"
    readme = (root / "README.md").read_text()
    names = sorted(p.name for p in root.glob("*.json"))
    expected = {f"zero{s}_{d}.json" for s in (1, 2, 3) for d in ("fp32", "fp16", "bf16")} | {"zero3_bf16_offload.json"}
    assert set(names) == expected
    for name in names:
        config = json.loads((root / name).read_text())
        assert f"`{name}`" in readme, f"{name} is not described in deepspeed_configs/README.md"
        stage = config["zero_optimization"]["stage"]
        assert f"zero{stage}_" in name
        if "fp16" in name:
            assert config["fp16"]["enabled"] and {"initial_scale_power", "loss_scale_window", "hysteresis",
                                                   "min_loss_scale"} <= set(config["fp16"])
        if "bf16" in name:
            assert config["bf16"]["enabled"]
        if "offload" in name:
            assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert config["optimizer"]["type"] in ("SGD", "Adam", "AdamW"), f"{name}: the centers follow SGD, Adam, AdamW"


def test_fp32_master_copy_of_bf16_centers_keeps_small_updates():
    torch.manual_seed(0)
    start = torch.randn(6, 4).to(torch.bfloat16)
    grads = [torch.randn(6, 4) for _ in range(50)]
    runs = {}
    for master in (True, False):
        w = torch.nn.Parameter(start.clone())
        opt = ShardedCenterOptimizer(w, "sgd", lr=1e-4, momentum=0.9, master_weights=master)
        assert ("master" in opt.state) is master
        for step, g in enumerate(grads):
            w.grad = g.to(torch.bfloat16)
            opt.step(torch.tensor([0, 2, 5]) if step % 2 else None)
        runs[master] = (w.detach().clone(), opt)
    # Reference: the same steps on fp32 weights, same (bf16-rounded) gradients.
    ref = torch.nn.Parameter(start.float())
    ref_opt = ShardedCenterOptimizer(ref, "sgd", lr=1e-4, momentum=0.9)
    for step, g in enumerate(grads):
        ref.grad = g.to(torch.bfloat16).float()
        ref_opt.step(torch.tensor([0, 2, 5]) if step % 2 else None)
    weight, opt = runs[True]
    assert torch.equal(opt.state["master"], ref.detach())
    assert torch.equal(weight, ref.detach().to(torch.bfloat16))
    lost = runs[False][0]  # updates below half a bf16 step are rounded away every step
    assert (lost == start).sum() > (weight == start).sum()
    assert (lost.float() - ref.detach()).abs().mean() > 2 * (weight.float() - ref.detach()).abs().mean()
    with pytest.raises(ValueError, match="needs bf16/fp16 centers"):
        ShardedCenterOptimizer(torch.nn.Parameter(torch.zeros(2, 2)), "sgd", master_weights=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_kernel_step_equals_unfused_step(name, dtype):
    """Full-softmax steps go through torch's fused kernel and match the unfused path (bf16: fp32 masters)."""
    if not _fused_kernel_exists("cpu", torch.float32):
        pytest.skip("this torch has no fused CPU optimizer kernels")
    ours_kwargs, _ = CASES[name]
    w0 = torch.randn(6, 5, generator=torch.Generator().manual_seed(5)).to(dtype)
    fused, plain = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_fused, opt_plain = ShardedCenterOptimizer(fused, **ours_kwargs), ShardedCenterOptimizer(plain, fused=False, **ours_kwargs)
    for grad in _grads(4, 6, 5, seed=6):
        fused.grad, plain.grad = grad.to(dtype), grad.to(dtype)
        opt_fused.step(None, grad_scale=0.5)
        opt_plain.step(None, grad_scale=0.5)
    assert (opt_fused.fused_steps, opt_plain.fused_steps) == (4, 0)
    for key, value in opt_plain.state.items():
        torch.testing.assert_close(opt_fused.state[key], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.detach(), plain.detach(), rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("max_groups", [256, 1])
def test_all_row_steps_after_partial_steps_stay_lazy(max_groups, monkeypatch):
    """Rows at different step counts (after Partial FC steps): fused per group of rows at one step count,
    or (past the group limit) unfused; row by row exact either way."""
    monkeypatch.setattr("ffc_parallel.optim.center_optimizer._MAX_FUSED_GROUPS", max_groups)
    ours_kwargs, make_torch = CASES["adamw"]
    w0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = torch.nn.Parameter(w0.clone())
    opt = ShardedCenterOptimizer(ours, **ours_kwargs)
    per_row = [torch.nn.Parameter(w0[i].clone()) for i in range(5)]
    per_row_opts = [make_torch([p]) for p in per_row]
    for step, grad in enumerate(_grads(4, 5, 3, seed=8)):
        rows = torch.tensor([1, 3]) if step == 1 else None
        ours.grad = grad.clone()
        opt.step(rows)
        for i in (rows.tolist() if rows is not None else range(5)):
            per_row[i].grad = grad[i].clone()
            per_row_opts[i].step()
    assert opt.fused_steps == (4 if max_groups > 1 else 2) and opt.state["step"].tolist() == [3, 4, 3, 4, 3]
    torch.testing.assert_close(ours.detach(), torch.stack([p.detach() for p in per_row]), rtol=1e-12, atol=1e-14)
