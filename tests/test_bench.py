"""The benchmark runner: the full-logits baseline equals the head, and a tiny run writes the JSON
schema (speeds are never asserted)."""
import json

import pytest
import torch

import ffc_parallel as fp
from benchmarks import head_bench
from benchmarks.full_logits import FullLogitsHead


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_full_logits_baseline_equals_the_head_on_its_classes(sample_rate):
    torch.manual_seed(0)
    dim, num_classes = 16, 300
    x = torch.randn(12, dim, dtype=torch.float64)
    y = torch.randint(num_classes, (12,))
    # s=16: at s=64 the baseline, like Partial FC v2, clamps target probabilities below 1e-30. Its
    # margin runs outside autograd, so its gradient is the straight-through one.
    arcface = fp.CombinedMargin(16.0, 1.0, 0.5, 0.0, straight_through=True)
    base = FullLogitsHead(dim, num_classes, sample_rate=sample_rate, s=16.0).double()
    head = fp.ShardedClassifier(dim, num_classes, margin=arcface, dtype=torch.float64)
    assert torch.equal(base.weight, head.weight)        # same rows from the same seed
    xb, xh = x.clone().requires_grad_(), x.clone().requires_grad_()
    base.generator.manual_seed(5)
    loss_b = base(xb, y)
    loss_b.backward()
    if sample_rate < 1.0:   # the head restricted to the classes the baseline sampled
        base.generator.manual_seed(5)
        index, labels = base._sample(y)
        assert index.numel() == int(sample_rate * num_classes) and set(y.tolist()) <= set(index.tolist())
        head = fp.ShardedClassifier(dim, index.numel(), margin=arcface, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(base.weight[index])
        y = labels
    loss_h = head(xh, y)
    loss_h.backward()
    torch.testing.assert_close(loss_b, loss_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xb.grad, xh.grad, rtol=1e-8, atol=1e-10)
    if sample_rate == 1.0:
        torch.testing.assert_close(base.weight.grad, head.weight.grad, rtol=1e-8, atol=1e-10)


def test_tiny_run_writes_the_json_schema_and_skips_what_cannot_fit(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert head_bench.main(["--case", "300,8,16,1.0,2", "--case", "4000000,1024,512,1.0,2", "--steps", "2",
                            "--memory-limit", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == head_bench.SCHEMA and report["machine"]["cores"] >= 1
    assert report["source"]["commit"] and report["command"].startswith("python -m benchmarks.head_bench --case")
    small, big = report["cases"]
    assert small["config"] == dict(classes_per_rank=300, batch=8, dim=16, sample_rate=1.0, ranks=2, dtype="fp32")
    for method in head_bench.METHODS:
        r = small["results"][method]
        assert r["status"] == "ok", r
        assert len(r["step_times_s"]) == 2 and r["step_time_s"] > 0 and r["step_cpu_time_s"] >= 0
        assert r["peak_rss_bytes"] > r["base_rss_bytes"] > 0
        assert big["results"][method]["status"] == "skipped"
        assert "> memory limit 3.0 GiB" in big["results"][method]["reason"]
    assert all(small["results"][m]["loss"] > 0 for m in ("ffc_head", "full_logits"))
    assert set(small["ratios"]) >= {"head_time_over_floor", "baseline_time_over_head",
                                    "head_growth_minus_weights_and_grads_bytes"}
    assert big["ratios"] == {}
    table = capsys.readouterr().out
    assert "| 3e+02 | 8 | 16 | 1.0 | 2 |" in table and "| 4e+06 | 1024 | 512 | 1.0 | 2 | skipped |" in table


def test_time_budget_skips_instead_of_running_and_ffc_bench_prints_tables(tmp_path, capsys):
    out = tmp_path / "skip.json"
    head_bench.main(["--case", "300,8,16,1.0,1", "--time-budget", "0", "--out", str(out)])
    assert all(r["status"] == "skipped" and "time budget" in r["reason"]
               for r in json.loads(out.read_text())["cases"][0]["results"].values())
    capsys.readouterr()
    assert head_bench.main(["--table", str(out)]) == 0
    assert "| 3e+02 | 8 | 16 | 1.0 | 1 | skipped | skipped | skipped |" in capsys.readouterr().out


def test_center_optimizer_benchmark_writes_its_table(tmp_path):
    from benchmarks import center_optimizer

    out = tmp_path / "co.json"
    assert center_optimizer.main(["--classes", "2000", "--dim", "8", "--steps", "1", "--dtypes", "fp32",
                                  "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["optimizer"] for r in report["results"]] == ["sgd_momentum", "adamw"]
    assert all(r["fused_s"] > 0 and r["unfused_s"] > 0 for r in report["results"])


def test_planner_rates_writes_what_ffc_plan_reads(tmp_path, capsys):
    """A tiny run of benchmarks/planner_rates.py: its JSON's rates are the plan's (explicit options win)."""
    from benchmarks import planner_rates
    from ffc_parallel.cli.plan import main as plan_main
    out = tmp_path / "rates.json"
    rates = planner_rates.main(["--rows", "20000", "--step-rows", "4000", "--steps", "1", "--block", "64",
                                "--dir", str(tmp_path / "store"), "--out", str(out)])
    assert json.loads(out.read_text())["compute_rate"] == rates["compute_rate"] > 0
    assert {r["path"] for r in rates["store"]} == {"runs", "mapping"} and not (tmp_path / "store").exists()
    args = ["--num-classes", "1e6", "--dim", "128", "--gpus", "2", "--sample-rate", "0.1", "--device", "cpu",
            "--center-storage", "disk", "--negative-sampling", "block", "--rates", str(out), "--json"]
    capsys.readouterr()
    assert plan_main(args) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["compute_rate"] == rates["compute_rate"] and config["page_cpu_seconds"] == rates["page_cpu_seconds"]
    assert plan_main(args + ["--page-cpu-seconds", "1e-3"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["page_cpu_seconds"] == 1e-3
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit):
        plan_main(args[:-3] + ["--rates", str(tmp_path / "bad.json")])
    assert "none of compute_rate" in capsys.readouterr().err


def test_heap_sampler_summary_picks_the_baseline_and_the_training_peaks():
    """Hand-made samples ``(time, live, free_held, rss, file_rss)``: the baseline is the first sample at the
    training's start (after the trim), the peaks are the training's (evaluation after ``training_end`` left
    out), and the RSS growth splits into its parts (worked by hand)."""
    from benchmarks.heap_sampler import summarize
    mb = 1 << 20
    samples = [(0.0, 300 * mb, 9 * mb, 600 * mb, 80 * mb), (1.0, 250 * mb, 1 * mb, 500 * mb, 70 * mb),  # setup, trimmed
               (2.0, 600 * mb, 50 * mb, 900 * mb, 75 * mb), (3.0, 700 * mb, 20 * mb, 950 * mb, 76 * mb),  # training
               (4.0, 650 * mb, 90 * mb, 980 * mb, 78 * mb), (5.0, 900 * mb, 0, 1500 * mb, 90 * mb)]       # evaluation
    out = summarize(samples, training_start=0.5, training_end=4.5)
    assert out["before_training"] == {"live": 250 * mb, "free_held": 1 * mb, "rss": 500 * mb, "file_rss": 70 * mb}
    assert out["at_rss_peak"]["rss"] == 980 * mb and out["free_held_at_rss_peak"] == 90 * mb
    assert out["rss_growth"] == 480 * mb and out["live_growth"] == 450 * mb
    # at the RSS peak: live +400, free +89, file +8, so 480 - 497 = -17 MB outside malloc (glibc gave some back)
    assert out["rss_growth_parts"] == {"live": 400 * mb, "free_held": 89 * mb, "file_rss": 8 * mb, "other": -17 * mb}
    with pytest.raises(SystemExit, match="no sample"):
        summarize(samples[:2], training_start=1.5, training_end=4.5)   # one sample at most
