"""A face-recognition run end to end: ffc-train's presets in configs/ against insightface's recipes, an
r18 trained under ZeRO-3 with gradient checkpointing on 2 ranks, and ffc-export's ONNX model (run in
onnxruntime against torch) and class centers (against the saved shards)."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ffc_parallel.cli.export import export_onnx, main as export
from ffc_parallel.cli.recipe import check_options, parse_margin
from ffc_parallel.cli.train import deepspeed_config, parse_options
from ffc_parallel.evaluation.report import read_log
from ffc_parallel.models import build_backbone
from ffc_parallel.testing import run_ranks
from tests.zero3 import needs_safe_gather

ROOT = Path(__file__).resolve().parents[1]
ARCFACE, COSFACE = (64.0, 1.0, 0.5, 0.0), (64.0, 1.0, 0.0, 0.4)
# The values of insightface's recognition/arcface_torch/configs/<source>.py (margin_list at s = 64, network,
# weight_decay, sample_rate, num_epoch; all: embedding_size 512, SGD lr 0.1 momentum 0.9, batch 128, fp16).
RECIPES = {"ms1mv3_r50": ("ms1mv3_r50", ARCFACE, "r50", 5e-4, 1.0, 20),
           "ms1mv3_r100": ("ms1mv3_r100", ARCFACE, "r100", 5e-4, 1.0, 20),
           "glint360k_r100": ("glint360k_r100", COSFACE, "r100", 1e-4, 1.0, 20),
           "wf42m_pfc02_r100": ("wf42m_pfc02_r100", COSFACE, "r100", 5e-4, 0.2, 20),
           "synthetic_r18": ("ms1mv3_r50", ARCFACE, "r18", 5e-4, 1.0, 2)}


def _onnx_embeddings(path, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"input": x})[0]


def _close(got: np.ndarray, expected: np.ndarray) -> bool:
    """Within 1e-4 of torch's embeddings, relative to their largest entry (fp32 rounding grows with it)."""
    return np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def _metadata(path) -> dict:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    return {p.key: p.value for p in model.metadata_props}


def test_presets_are_insightface_recipes_and_load_through_ffc_train(tmp_path):
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) == sorted(RECIPES)
    for target in ("lfw", "cfp_fp", "agedb_30"):   # check_options looks for the presets' val_targets next to the data
        (tmp_path / f"{target}.bin").write_bytes(b"")
    for name, (source, margin, backbone, weight_decay, sample_rate, epochs) in RECIPES.items():
        path = ROOT / "configs" / f"{name}.yaml"
        assert f"arcface_torch/configs/{source}.py" in path.read_text(), name
        opts = parse_options(["--config", str(path)])
        on_gpu = name != "synthetic_r18"
        assert (opts.val_targets, opts.val_every) == (("lfw,cfp_fp,agedb_30", 2000) if on_gpu else (None, 0)), name
        if on_gpu:
            with pytest.raises(FileNotFoundError, match=f"{opts.data_path}/lfw.bin not found"):
                check_options(opts)
            opts = dataclasses.replace(opts, data_path=str(tmp_path))
        check_options(opts)
        m = parse_margin(opts.margin)
        assert (m.s, m.m1, m.m2, m.m3) == margin, name
        assert (opts.backbone, opts.weight_decay, opts.sample_rate, opts.epochs) == (backbone, weight_decay,
                                                                                     sample_rate, epochs), name
        assert (opts.embedding_dim, opts.optimizer, opts.lr, opts.momentum, opts.schedule) == (
            512, "sgd", 0.1, 0.9, "linear"), name
        ds = deepspeed_config(dataclasses.replace(opts, deepspeed_config=str(ROOT / opts.deepspeed_config)), 1000)
        assert ds.get("fp16", {}).get("enabled", False) == on_gpu and ds["gradient_clipping"] == 5.0, name
        if on_gpu:
            assert (opts.data, opts.image_size, opts.channels, opts.batch_size) == ("recordio", 112, 3, 128), name


def test_onnx_model_computes_torch_embeddings_for_any_batch(tmp_path):
    for name, shape, opset in (("mbf", (3, 24, 24), 11), ("r18", (1, 16, 16), 17)):
        torch.manual_seed(0)
        model = build_backbone(name, shape, 32)
        for m in model.modules():   # BatchNorm statistics of the data (averaged), not their initial values
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(8, *shape) * 2 + 0.5)
        model.eval()
        path = tmp_path / f"{name}.onnx"
        export_onnx(model, shape, path, opset=opset, metadata={"backbone": name})
        x = torch.randn(5, *shape)   # exported with a batch of 2: the batch axis is dynamic
        with torch.no_grad():
            expected = model(x).numpy()
        got = _onnx_embeddings(path, x.numpy())
        assert got.shape == (5, 32) and _close(got, expected), (name, np.abs(got - expected).max())
        assert _metadata(path) == {"opset": str(opset), "producer": "ffc_parallel ffc-export", "backbone": name}


RUN = ["--config", str(ROOT / "configs" / "synthetic_r18.yaml"), "--num-identities", "120", "--unseen-identities",
       "10", "--eval-ids-per-bucket", "10", "--embedding-dim", "48", "--batch-size", "8", "--max-steps", "3",
       "--log-every", "1"]   # 3 steps at learning rates 0, 0.05, 0.1


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory):
    """``(output directory, metrics)`` of 3 steps of the r18 preset on 2 ranks under ZeRO-1."""
    out = tmp_path_factory.mktemp("zero1") / "run"
    argv = RUN + ["--deepspeed-config", str(ROOT / "deepspeed_configs" / "zero1_fp32.json"), "--output-dir", str(out)]
    return out, run_ranks("tests.cases_train:train_run", world_size=2, timeout=240, kwargs=dict(argv=argv))[0]


@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_a_trained_r18_exports_onnx_and_its_class_centers(zero1_run, tmp_path, capsys):
    out, metrics = zero1_run
    ckpt = out / "checkpoints"
    files = {k: tmp_path / f"model.{k}" for k in ("pt", "onnx", "npy")}
    assert export([str(ckpt), str(files["pt"]), "--onnx", str(files["onnx"]), "--centers", str(files["npy"])]) == 0

    backbone = build_backbone("r18", (3, 16, 16), 48)
    backbone.load_state_dict(torch.load(files["pt"]))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = backbone.eval()(x).numpy()
    assert _close(_onnx_embeddings(files["onnx"], x.numpy()), expected)
    assert _metadata(files["onnx"]) == {"opset": "17", "producer": "ffc_parallel ffc-export", "backbone": "r18",
                                        "input_shape": "3,16,16", "embedding_dim": "48", "checkpoint": "step3"}

    shards = sorted((ckpt / "step3" / "ffc_shards" / "head").glob("shard_*.pt"))
    saved = [torch.load(p, weights_only=True) for p in shards]
    assert len(saved) == 2 and all(s["weight"].shape[0] > 0 for s in saved)
    rows = torch.cat([s["weight"] for s in sorted(saved, key=lambda s: s["range"][0])])
    centers = np.load(files["npy"])
    assert centers.dtype == np.float32 and centers.shape == (metrics["head_classes"], 48)
    assert np.array_equal(centers, rows.float().numpy())

    capsys.readouterr()
    assert export([str(ckpt), "--onnx", str(tmp_path / "bad.onnx"), "--input-shape", "3,40,40"]) == 2
    assert "do not fit --backbone r18 with input shape [3, 40, 40]" in capsys.readouterr().err
    assert export([str(ckpt), "--centers", str(tmp_path / "bad.npy"), "--part", "classifier"]) == 2
    assert "--part classifier: " in capsys.readouterr().err and not (tmp_path / "bad.npy").exists()
    with pytest.raises(SystemExit):
        export([str(ckpt)])   # nothing to write


@needs_safe_gather
@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_zero3_with_gradient_checkpointing_trains_r18_as_zero1_does(zero1_run, tmp_path):
    """The same 3 steps under ZeRO-3 with --gradient-checkpointing: the losses, weights and BatchNorm
    statistics of the ZeRO-1 run without it."""
    plain, _ = zero1_run
    out = tmp_path / "run"
    argv = RUN + ["--deepspeed-config", str(ROOT / "deepspeed_configs" / "zero3_fp32.json"), "--gradient-checkpointing",
                  "--output-dir", str(out)]
    assert run_ranks("tests.cases_train:train_run", world_size=2, timeout=240, kwargs=dict(argv=argv))[0]["steps"] == 3
    losses = [read_log(d / "metrics.csv")["loss"] for d in (out, plain)]
    assert len(losses[0]) == 3 and np.allclose(losses[0], losses[1], rtol=1e-5), losses
    for run in (out, plain):
        assert export([str(run / "checkpoints"), str(tmp_path / f"{run.parent.name}.pt")]) == 0
    mine, theirs = (torch.load(tmp_path / f"{run.parent.name}.pt") for run in (out, plain))
    assert torch.equal(mine["features.weight"], torch.ones(48))   # the frozen scale survives ZeRO-3's merge
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.allclose(mine[key].double(), value.double(), rtol=1e-4, atol=1e-6), key
