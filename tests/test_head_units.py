"""Single-process unit tests of the head's parts: margins, chunk planning, sampling, sharding, init."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ffc_parallel as fp
from ffc_parallel.distributed import streams
from ffc_parallel.heads.sampling import negative_candidates, sample_rows
from ffc_parallel.heads.classifier import init_class_rows
from ffc_parallel.heads.row_loss import CrossEntropy
from ffc_parallel.heads.softmax_ce import ChunkPlan, LossOptions, ShardedMarginSoftmaxCE, Targets
from tests.reference import dense_margin_loss, rel_err


def test_shard_range_matches_design_formula():
    for num_classes, world in [(10, 3), (7, 7), (3, 4), (1000, 8), (5, 1)]:
        stops = 0
        for rank in range(world):
            start, stop = fp.shard_range(num_classes, world, rank)
            assert start == num_classes // world * rank + min(rank, num_classes % world)
            assert stop - start == num_classes // world + (rank < num_classes % world)
            assert start == stops
            stops = stop
        assert stops == num_classes


def test_init_rows_independent_of_sharding():
    full = init_class_rows(0, 200_000, 3, 0.01, seed=7)
    for start, stop in [(0, 1), (65_535, 65_537), (131_000, 200_000), (5, 5)]:
        assert torch.equal(init_class_rows(start, stop, 3, 0.01, seed=7), full[start:stop])
    assert not torch.equal(init_class_rows(0, 10, 3, 0.01, seed=8), full[:10])


def test_seed_streams_are_apart_from_torch_manual_seed_and_from_each_other():
    # A user's torch.randn after torch.manual_seed(0) must not be the head's centers of seed 0 (it was).
    torch.manual_seed(0)
    user = F.normalize(torch.randn(64, 8), dim=1)
    centers = F.normalize(fp.ShardedClassifier(8, 64, seed=0).weight.detach(), dim=1)
    assert float((user @ centers.t()).max()) < 0.999
    draws = {name: torch.rand(4, generator=streams.generator(0, name, 1)) for name in streams.STREAMS}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(streams.STREAMS)
    assert torch.equal(torch.rand(4, generator=streams.generator(0, "partial_fc", 1)), draws["partial_fc"])
    assert len(set(streams.STREAMS.values())) == len(streams.STREAMS), "two streams share a salt"
    with pytest.raises(KeyError, match="unknown random stream"):
        streams.generator(0, "no_such_stream")


def test_margin_shorthands_and_validation():
    assert fp.heads.resolve_margin("arcface") == fp.CombinedMargin(64.0, 1.0, 0.5, 0.0)
    assert fp.heads.resolve_margin("cosface") == fp.CombinedMargin(64.0, 1.0, 0.0, 0.4)
    assert fp.heads.resolve_margin(None, 30) == fp.CombinedMargin(30.0)
    assert fp.CombinedMargin(1, 2, 3 / 10, 4 / 10) == fp.CombinedMargin(s=1, m1=2, m2=0.3, m3=0.4)
    with pytest.raises(ValueError, match="unknown margin"):
        fp.heads.resolve_margin("sphereface")
    with pytest.raises(ValueError, match="m2 must be"):
        fp.CombinedMargin(64, 1, 4.0)


def test_arcface_target_continuous_and_increasing_past_the_wrap():
    m = fp.heads.resolve_margin("arcface")
    c = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    f = m.target(c)
    assert (f[1:] > f[:-1]).all(), "target must increase with the cosine"
    wrap = math.cos(math.pi - 0.5)
    near = torch.tensor([wrap - 1e-9, wrap + 1e-9], dtype=torch.float64)
    assert float(m.target(near).diff().abs()) < 1e-8, "target must be continuous at the wrap point"
    assert abs(float(m.target(torch.tensor(wrap, dtype=torch.float64))) + 1.0) < 1e-12


def test_true_and_straight_through_gradients():
    exact = fp.heads.resolve_margin("arcface")
    c = torch.tensor([0.9, 0.5, 0.0, -0.5, -0.95], dtype=torch.float64, requires_grad=True)
    exact.target(c).sum().backward()
    assert rel_err(exact.target_grad(c.detach()), c.grad) < 1e-10
    theta = math.radians(45)
    ratio = float(exact.target_grad(torch.tensor(math.cos(theta), dtype=torch.float64)))
    assert abs(ratio - math.sin(theta + 0.5) / math.sin(theta)) < 1e-12 and 1.3 < ratio < 1.4
    st = fp.CombinedMargin(64, 1, 0.5, 0, straight_through=True)
    assert torch.equal(st.target_grad(c.detach()), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("rows,threshold,chunk,soft", [(None, None, 2, False), (torch.tensor([0, 2, 3, 6, 8]), None, 3, False),
                                                       (None, 0.3, 4, False), (None, None, 4, True),
                                                       (torch.tensor([1, 2, 4, 5, 7, 8]), 0.2, 5, True)])
def test_gradcheck_fused_function(rows, threshold, chunk, soft):
    torch.manual_seed(0)
    xn = torch.randn(6, 4, dtype=torch.float64).requires_grad_()
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    cols = 9 if rows is None else rows.numel()
    target = torch.randint(cols, (6, 3 if soft else 1))
    target[1, 0] = -1  # owned by another rank
    targets = Targets(target)
    if soft:
        target[2, 2] = target[2, 0]  # a soft target on the label itself
        q = torch.rand(6, 3, dtype=torch.float64)
        targets = Targets(target, q / q.sum(1, keepdim=True), torch.rand(6, dtype=torch.float64) + 0.5)
    margin = fp.CombinedMargin(4.0, 1.0, 0.3, 0.1)
    for cached in (0, 99):
        plan = ChunkPlan(chunk, cached)
        options = LossOptions(margin, threshold, plan, None, CrossEntropy())
        fn = lambda a, b: ShardedMarginSoftmaxCE.apply(a, b, rows, targets, options)
        # A second backward through the same graph recomputes the freed cache: equal up to rounding.
        assert torch.autograd.gradcheck(fn, (xn, w), eps=1e-6, atol=1e-7, nondet_tol=1e-12)


def test_fp32_head_close_to_float64_reference():
    torch.manual_seed(1)
    head = fp.ShardedClassifier(16, 50, margin="arcface", chunk_size=7)
    x = torch.randn(12, 16, requires_grad=True)
    y = torch.randint(50, (12,))
    loss = head(x, y)
    loss.backward()
    rx = x.detach().double().requires_grad_()
    rw = head.weight.detach().double().requires_grad_()
    ref = dense_margin_loss(rx, rw, y, 64.0, 1.0, 0.5, 0.0)
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) < 1e-5
    assert rel_err(x.grad, rx.grad) < 1e-4 and rel_err(head.weight.grad, rw.grad) < 1e-4


def test_chunk_plan_respects_budget():
    plan = ChunkPlan.for_budget(batch=256, num_cols=1_000_000, elem_bytes=4, budget_bytes=256 << 20)
    work = 3 * 256 * 4 * plan.chunk
    cache = plan.cached * 256 * 4 * plan.chunk
    assert work <= (256 << 20) // 4 + 256 * 4 and work + cache <= 256 << 20
    small = ChunkPlan.for_budget(batch=64, num_cols=1000, elem_bytes=4, budget_bytes=256 << 20)
    assert small.chunk == 1000 and small.cached == 1, "a small shard is computed once and kept"
    assert ChunkPlan.for_budget(8, 100, 4, 1 << 30, chunk_size=7).chunk == 7


def _draw(positives, num_local, num_sample, step, mode="uniform", block=1):
    g = streams.generator(0, "partial_fc", 0, step)
    return sample_rows(positives, negative_candidates(num_local, num_sample, g, mode, block), num_sample)


@pytest.mark.parametrize("mode,block", [("uniform", 1), ("block", 4)])
def test_sampler_keeps_positives_counts_and_is_uniform(mode, block):
    positives = torch.tensor([3, 10, 11])
    counts = torch.zeros(40)
    for step in range(3000):
        rows = _draw(positives, 40, 8, step, mode, block)
        assert rows.numel() == 8 and torch.isin(positives, rows).all()
        assert torch.equal(rows, rows.unique())
        counts[rows] += 1
    negatives = counts[~torch.isin(torch.arange(40), positives)]
    expected = 3000 * 5 / 37
    if mode == "block":   # rows sharing a block with a positive are drawn a little more often
        negatives = counts[~torch.isin(torch.arange(40) // block, positives // block)]
    assert float((negatives - expected).abs().max()) < 5 * math.sqrt(expected)
    # the dense regime (most rows wanted) and more positives than the sample size
    assert _draw(positives, 40, 30, 1, mode, block).numel() == 30
    assert torch.equal(_draw(positives, 40, 2, 1, mode, block), positives)


def test_sampled_rows_equal_the_plain_formula_with_positives_among_and_outside_the_candidates(monkeypatch):
    """``sample_rows`` looks at the first ``want + P`` candidates a piece at a time and sorts one tensor in
    place: the same rows as ``sort(cat(positives, candidates not positives [:want]))``."""
    from ffc_parallel.optim import row_sets
    monkeypatch.setattr(row_sets, "PIECE", 5)
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 500, (1,), generator=gen))
        num_sample = int(torch.randint(1, n + 1, (1,), generator=gen))
        candidates = negative_candidates(n, num_sample, gen, ("uniform", "block")[trial % 2], 6)
        positives = torch.randperm(n, generator=gen)[:int(torch.randint(0, min(n, 40) + 1, (1,), generator=gen))]
        among = candidates[torch.randperm(candidates.numel(), generator=gen)[:positives.numel() // 2]]
        positives = torch.cat([positives[:positives.numel() - among.numel()], among]).unique()
        want = min(num_sample, candidates.numel()) - positives.numel()
        plain = positives if want <= 0 else \
            torch.cat([positives, candidates[~torch.isin(candidates, positives)][:want]]).sort().values
        assert torch.equal(sample_rows(positives, candidates, num_sample), plain), trial


def test_block_candidates_are_whole_runs_of_rows():
    rows = negative_candidates(1000, 64, streams.generator(0, "partial_fc", 0, 0), "block", 16)
    assert rows.numel() == 64 and rows.unique().numel() == 64
    blocks = rows.view(4, 16)
    assert torch.equal(blocks.sort(dim=1).values, (blocks.min(dim=1, keepdim=True).values + torch.arange(16)))
    assert bool((blocks.min(dim=1).values % 16 == 0).all())
    with pytest.raises(ValueError, match="negative_sampling"):
        negative_candidates(10, 2, streams.generator(0, "partial_fc", 0, 0), "pages")


def test_block_draw_with_a_short_last_block_matches_the_plain_formula():
    """The block draw builds its rows in place and filters only when the short last block was drawn: the
    same rows, in the same order, as ``(blocks * block + (arange + turn) % block)`` filtered to the shard."""
    def plain(num_local, count, g, block):
        from ffc_parallel.heads.sampling import _distinct
        blocks = _distinct(-(-num_local // block), -(-count // block) + 1, g)
        turn = torch.randint(block, (blocks.numel(), 1), generator=g)
        rows = (blocks.unsqueeze(1) * block + (torch.arange(block) + turn) % block).flatten()
        return rows[rows < num_local][:count]
    short_seen = 0
    for step in range(200):
        new = negative_candidates(37, 12, streams.generator(0, "partial_fc", 0, step), "block", 8)
        ref = plain(37, 12, streams.generator(0, "partial_fc", 0, step), 8)
        assert torch.equal(new, ref) and bool((new < 37).all()) and new.unique().numel() == new.numel()
        short_seen += bool((new >= 32).any())
    assert short_seen > 0, "no draw took the short last block"


def test_head_keeps_its_last_candidate_draw():
    """A head's candidates of a step are drawn once (the prefetch of a stored head and the step's selection
    ask for the same step) and equal a fresh draw of the pure function."""
    head = fp.ShardedClassifier(16, 3000, sample_rate=0.1, negative_sampling="block", sample_block=8)
    first = head.negative_candidates(5)
    assert head.negative_candidates(5) is first
    fresh = negative_candidates(head.num_local, head.num_sample, streams.generator(head.seed, "partial_fc", head.rank, 5),
                                "block", 8)
    assert torch.equal(first, fresh)
    assert not torch.equal(head.negative_candidates(6), first)


def test_eval_mode_uses_every_class():
    head = fp.ShardedClassifier(4, 30, sample_rate=0.1)
    x, y = torch.randn(3, 4), torch.tensor([1, 2, 3])
    head(x, y)
    assert head.last_sampled_rows is not None and head.last_sampled_rows.numel() == 3
    head.eval()
    head(x, y)
    assert head.last_sampled_rows is None


def test_init_distributed_alone_with_no_environment():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    code = ("import ffc_parallel as fp; a = fp.init_distributed(); b = fp.init_distributed(); "
            "assert a is b; print(a.world_size, a.rank, a.backend, a.launcher)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 0 gloo single process"
    assert "ffc_parallel: launcher=single process, world_size=1" in out.stderr


def test_partial_fc_adds_only_sampled_rows_into_existing_grad():
    torch.manual_seed(3)
    make = lambda: fp.ShardedClassifier(4, 60, sample_rate=0.2, dtype=torch.float64, seed=5)
    head, twin = make(), make()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(60, (6,))
    head(x, y).backward()
    head.weight.grad.fill_(7.0)            # a gradient that is already there (accumulation)
    head(x, y).backward()                  # second draw of negatives
    rows = head.last_sampled_rows
    twin.sample_step = 1                   # the same draw, from no gradient at all
    twin(x, y).backward()
    assert torch.equal(twin.last_sampled_rows, rows)
    untouched = torch.ones(60, dtype=torch.bool)
    untouched[rows] = False
    assert (head.weight.grad[untouched] == 7.0).all()
    assert torch.allclose(head.weight.grad[rows], 7.0 + twin.weight.grad[rows], rtol=0, atol=1e-12)
    assert not twin.weight.grad[untouched].any()


def test_cpu_logit_cache_arena_is_reused_lent_once_and_changes_no_value():
    """The head's cache arena: the same losses and gradients as tiles of their own over several steps; one
    buffer from step to step; a second forward before the first's backward allocates its own tiles; a graph
    dropped without its backward lends the arena back."""
    import gc

    def run(head, steps=3):
        torch.manual_seed(1)
        x, y = torch.randn(32, 16, requires_grad=True), torch.randint(3000, (32,))
        out = []
        for _ in range(steps):
            head.zero_grad(set_to_none=True)
            x.grad = None
            loss = head(x, y)
            loss.backward()
            out.append((loss.item(), x.grad.clone(), head.weight.grad.clone()))
        return out

    torch.manual_seed(0)
    with_arena = fp.ShardedClassifier(16, 3000, margin="arcface")
    without = fp.ShardedClassifier(16, 3000, margin="arcface")
    assert torch.equal(with_arena.weight, without.weight)   # rows drawn from the head's seed
    without._cache_arena = None
    a, b = run(with_arena), run(without)
    assert all(p[0] == q[0] and torch.equal(p[1], q[1]) and torch.equal(p[2], q[2]) for p, q in zip(a, b))
    arena = with_arena._cache_arena
    first = arena._buffer
    assert first is not None and first.numel() > 0 and not arena._lent
    run(with_arena, 1)
    assert arena._buffer is first, "the arena was allocated again"
    x, y = torch.randn(32, 16, requires_grad=True), torch.randint(3000, (32,))
    l1 = with_arena(x, y)
    assert arena._lent
    l2 = with_arena(x * 2, y)             # the arena is lent: this cache's tiles are its own
    (l1 + l2).backward()
    ref = x.grad.clone()
    x.grad = None
    m1, m2 = without(x, y), without(x * 2, y)
    (m1 + m2).backward()
    assert torch.equal(ref, x.grad) and not arena._lent
    dropped = with_arena(x, y)
    assert arena._lent
    del dropped
    gc.collect()
    assert not arena._lent, "a graph dropped without its backward kept the arena"


def test_half_tile_buffers_give_the_arithmetic_of_fresh_tensors():
    """bf16 centers: the norms through a stats-dtype tile, the product through a bf16 tile and the radial
    sum through an fp32 tile equal, bit for bit, what ``vector_norm(dtype=)``, a fresh ``mm`` and
    ``sum(dtype=)`` give."""
    from ffc_parallel.heads.stages import center_grad_, scaled_rows_, tile_logits_
    torch.manual_seed(0)
    w, xn = torch.randn(300, 64).bfloat16(), torch.randn(40, 64).bfloat16()
    h = torch.randn(300, 64).bfloat16()
    scales, vs = [], []
    for wide in (None, torch.full((512, 64), float("nan"))):
        scale, out = torch.empty(300), torch.empty(300, 64, dtype=torch.bfloat16)
        vs.append(scaled_rows_(w, None, 0, 300, scale, out, True, 30.0, wide).clone())
        scales.append(scale)
    assert torch.equal(scales[0], scales[1]) and torch.equal(vs[0], vs[1])
    logits = [torch.empty(40, 300), torch.empty(40, 300)]
    tile_logits_(logits[0], xn, vs[0])
    tile_logits_(logits[1], xn, vs[0], torch.full((40, 300), float("nan"), dtype=torch.bfloat16))
    assert torch.equal(*logits)
    grads = [center_grad_(h.clone(), vs[0], scales[0], 30.0, torch.empty(300, 64, dtype=torch.bfloat16), wide)
             for wide in (None, torch.full((300, 64), float("nan")))]
    assert torch.equal(*grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_released_center_gradient_is_written_again_and_leaks_nothing(dtype):
    """A CPU head's gradient released by the centers' step (``CenterTrainer.drop``) becomes the next
    backward's gradient buffer: the same storage, and the same gradients as a head that allocates a new
    one, though the released buffer is filled with NaN in between."""
    def run(head, reuse, steps=3):
        torch.manual_seed(1)
        out = []
        for _ in range(steps):
            x, y = torch.randn(32, 16, dtype=dtype, requires_grad=True), torch.randint(500, (32,))
            loss = head(x, y)
            loss.backward()
            grad = head.weight.grad
            out.append((loss.item(), x.grad.clone(), grad.clone(), grad.data_ptr()))
            head.centers.drop()                          # what the step does once the rows are updated
            assert head.weight.grad is None
            spare = head.centers._spare_grad
            assert spare is grad
            spare.fill_(float("nan"))
            if not reuse:
                head.centers.take_spare_grad()
        return out

    torch.manual_seed(0)
    heads = [fp.ShardedClassifier(16, 500, margin="arcface", dtype=dtype) for _ in range(2)]
    a, b = run(heads[0], True), run(heads[1], False)
    assert all(p[0] == q[0] and torch.equal(p[1], q[1]) and torch.equal(p[2], q[2]) for p, q in zip(a, b))
    assert len({p[3] for p in a}) == 1, "the released gradient was not written again"
    heads[0].eval()
    with torch.no_grad():
        heads[0](torch.randn(4, 16, dtype=dtype), torch.randint(500, (4,)))
    assert heads[0].centers._spare_grad is None, "an evaluation forward kept the released gradient"
