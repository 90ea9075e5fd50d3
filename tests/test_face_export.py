"""ffc-train's presets in configs/ against insightface's recipes."""
import dataclasses
from pathlib import Path

from ffc_parallel.cli.recipe import check_options, parse_margin
from ffc_parallel.cli.train import deepspeed_config, parse_options

ROOT = Path(__file__).resolve().parents[1]
ARCFACE, COSFACE = (64.0, 1.0, 0.5, 0.0), (64.0, 1.0, 0.0, 0.4)
# The values of insightface's recognition/arcface_torch/configs/<source>.py (margin_list at s = 64, network,
# weight_decay, sample_rate, num_epoch; all: embedding_size 512, SGD lr 0.1 momentum 0.9, batch 128, fp16).
RECIPES = {"ms1mv3_r50": ("ms1mv3_r50", ARCFACE, "r50", 5e-4, 1.0, 20),
           "ms1mv3_r100": ("ms1mv3_r100", ARCFACE, "r100", 5e-4, 1.0, 20),
           "glint360k_r100": ("glint360k_r100", COSFACE, "r100", 1e-4, 1.0, 20),
           "wf42m_pfc02_r100": ("wf42m_pfc02_r100", COSFACE, "r100", 5e-4, 0.2, 20),
           "synthetic_r18": ("ms1mv3_r50", ARCFACE, "r18", 5e-4, 1.0, 2)}


def test_presets_are_insightface_recipes_and_load_through_ffc_train():
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) == sorted(RECIPES)
    for name, (source, margin, backbone, weight_decay, sample_rate, epochs) in RECIPES.items():
        path = ROOT / "configs" / f"{name}.yaml"
        assert f"arcface_torch/configs/{source}.py" in path.read_text(), name
        opts = parse_options(["--config", str(path)])
        check_options(opts)
        m = parse_margin(opts.margin)
        assert (m.s, m.m1, m.m2, m.m3) == margin, name
        assert (opts.backbone, opts.weight_decay, opts.sample_rate, opts.epochs) == (backbone, weight_decay,
                                                                                     sample_rate, epochs), name
        assert (opts.embedding_dim, opts.optimizer, opts.lr, opts.momentum, opts.schedule) == (
            512, "sgd", 0.1, 0.9, "linear"), name
        ds = deepspeed_config(dataclasses.replace(opts, deepspeed_config=str(ROOT / opts.deepspeed_config)), 1000)
        on_gpu = name != "synthetic_r18"
        assert ds.get("fp16", {}).get("enabled", False) == on_gpu and ds["gradient_clipping"] == 5.0, name
        if on_gpu:
            assert (opts.data, opts.image_size, opts.channels, opts.batch_size) == ("recordio", 112, 3, 128), name
