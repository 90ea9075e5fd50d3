"""The random horizontal flip of training images: about half, a pure function of (seed, epoch, item)."""
import numpy as np
import torch

from ffc_parallel.data import TensorData
from ffc_parallel.data.augment import RandomFlip


def test_flips_about_half_and_the_same_ones_for_the_same_seed_epoch_and_item():
    x = torch.arange(2000 * 4 * 4, dtype=torch.float32).reshape(2000, 1, 4, 4)
    data = TensorData(x, torch.zeros(2000, dtype=torch.long))
    flip = RandomFlip(data, seed=3)
    mirrored = np.array([bool((flip[i][0] == x[i].flip(-1)).all()) for i in range(2000)])
    assert all(bool((flip[i][0] == x[i]).all()) for i in np.nonzero(~mirrored)[0][:50])
    assert 0.45 < mirrored.mean() < 0.55                      # binomial(2000, 1/2): 3 sigma is 0.034
    assert (mirrored == flip.flipped(np.arange(2000))).all()
    again = RandomFlip(data, seed=3)                           # another process, a resumed run
    assert (again.flipped(np.arange(2000)) == mirrored).all()
    assert again.flipped([1999, 7]).tolist() == mirrored[[1999, 7]].tolist()   # item by item, in any order
    again.epoch = 1
    other_epoch = again.flipped(np.arange(2000))
    assert 0.4 < (other_epoch != mirrored).mean() < 0.6       # a new draw each epoch
    assert 0.4 < (RandomFlip(data, seed=4).flipped(np.arange(2000)) != mirrored).mean() < 0.6


def test_ffc_train_flips_image_files_unless_no_flip(tmp_path):
    from PIL import Image

    from ffc_parallel.cli.recipe import Recipe
    from ffc_parallel.cli.train import TrainOptions
    from ffc_parallel.data import build_data
    for ident in range(12):
        (tmp_path / f"id{ident:02d}").mkdir()
        for k in range(3):
            Image.new("L", (8, 8), 20 * ident + k).save(tmp_path / f"id{ident:02d}" / f"{k}.png")
    opts = TrainOptions(data="imagefolder", data_path=str(tmp_path), image_size=8, unseen_fraction=0.3,
                        batch_size=4, embedding_dim=8)
    bundle = build_data("imagefolder", path=str(tmp_path), image_size=8, channels=1, unseen_fraction=0.3, seed=0)
    recipe = Recipe(opts, bundle, 0, 1, "cpu")
    assert isinstance(recipe.source, RandomFlip) and recipe.source.source is bundle.train
    recipe.start_epoch(2)
    assert recipe.flip.epoch == 2
    opts.no_flip = True
    assert Recipe(opts, bundle, 0, 1, "cpu").source is bundle.train
    synthetic = build_data("synthetic", num_identities=300, synthetic_mode="image", image_size=8,
                           unseen_identities=20, eval_ids_per_bucket=10)
    assert Recipe(TrainOptions(synthetic_mode="image", image_size=8), synthetic, 0, 1, "cpu").flip is None
