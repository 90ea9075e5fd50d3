"""Face verification sets in insightface's ``.bin`` format (LFW, CFP-FP, AgeDB-30, ...), read and written
without mxnet, and insightface's protocol on them.

Format: a pickle of ``(bins, issame_list)``. ``bins`` holds ``2 n`` encoded images (JPEG/PNG bytes; in
files written by Python 2 / mxnet, ``str`` items, read as ``bytes`` with ``encoding="bytes"``); pair ``i``
is images ``2i`` and ``2i + 1``, ``issame_list[i]`` says whether they show the same person.

Protocol (insightface's ``verification.py``): each image is decoded, resized to the model's input, scaled
to ``(x - 127.5) / 127.5`` (RGB, or one grey channel); its embedding is ``f(x) + f(flip(x))`` (horizontal
flip), L2-normalised. A pair's distance is the squared euclidean distance of the unit embeddings
(``2 - 2 cos``); a pair is called *same* when ``distance < threshold``. 10-fold accuracy: the pairs are
cut into 10 consecutive folds (``KFold(10, shuffle=False)``); for each fold the threshold of
``arange(0, 4, 0.01)`` with the best accuracy on the other nine folds (the first of equals) is applied
to it. Reported: the mean and standard deviation over the folds; also TAR@FAR of the cosine scores.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ..data.imagefolder import IMAGE_SUFFIXES, decode_image
from ..distributed import streams
from ..distributed.collectives import gather_rows
from ..distributed.init import get_rank, get_world_size
from .metrics import tar_at_far
from .runner import _my_slice, embed

THRESHOLDS = np.arange(0, 4, 0.01)   # insightface's thresholds of the squared distance


class VerificationSet:
    """The encoded images ``bins`` (``2 n`` bytes objects) and ``issame[n]`` (bool) of one ``.bin`` file."""

    def __init__(self, bins: list, issame, name: str = "pairs"):
        self.bins, self.issame, self.name = bins, np.asarray(issame, dtype=bool).reshape(-1), name
        if len(bins) != 2 * len(self.issame):
            raise ValueError(f"{name}: {len(bins)} images for {len(self.issame)} pairs (need 2 per pair)")
        if self.issame.all() or not self.issame.any():
            raise ValueError(f"{name}: verification needs both same and different pairs")

    @property
    def num_pairs(self) -> int:
        return len(self.issame)

    def images(self, lo: int, hi: int, size: int, channels: int) -> torch.Tensor:
        """Images ``lo .. hi-1`` decoded: ``[hi - lo, channels, size, size]`` in ``[-1, 1]``."""
        out = []
        for i in range(lo, hi):
            try:
                out.append(decode_image(self.bins[i], size, channels))
            except Exception as exc:
                raise ValueError(f"{self.name}: image {i} (pair {i // 2}) does not decode: "
                                 f"{type(exc).__name__}: {exc}") from None
        return torch.stack(out) if out else torch.zeros(0, channels, size, size)


def _as_bytes(item, path, i) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):   # numpy.bytes_ is a bytes
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype in (np.uint8, np.int8):
        return item.tobytes()
    raise ValueError(f"{path}: image {i} is a {type(item).__name__}, not encoded image bytes")


def load_verification_bin(path, name: str | None = None) -> VerificationSet:
    """Read an insightface ``.bin`` (Python 2 or 3 pickle); ``name`` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set {path} not found")
    try:
        with open(path, "rb") as f:
            loaded = pickle.load(f, encoding="bytes")
        bins, issame = loaded
    except Exception as exc:
        raise ValueError(f"{path}: not an insightface .bin (a pickle of (bins, issame_list)): "
                         f"{type(exc).__name__}: {exc}") from None
    return VerificationSet([_as_bytes(b, path, i) for i, b in enumerate(bins)], list(issame),
                           name or path.stem)


def _encode(image) -> bytes:
    """A file path (bytes as stored), encoded bytes, or a tensor ``[C, H, W]`` in ``[-1, 1]`` (PNG)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    from PIL import Image
    x = torch.as_tensor(image).detach().float().cpu()
    pixels = ((x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_verification_bin(path, pairs) -> int:
    """Write ``pairs``, an iterable of ``(image_a, image_b, is_same)``, as an insightface ``.bin``; an image
    is a file path, encoded bytes or a tensor ``[C, H, W]`` in ``[-1, 1]``. Returns the number of pairs."""
    bins, issame = [], []
    for a, b, same in pairs:
        bins += [_encode(a), _encode(b)]
        issame.append(bool(same))
    VerificationSet(bins, issame, str(path))   # the same checks as reading
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    return len(issame)


def pairs_from_folder(root, num_pairs: int, seed: int = 0) -> list:
    """``num_pairs`` pairs of image files of an ImageFolder layout ``root/<identity>/<file>``: the even
    ones of one identity (two different files), the odd ones of two identities, drawn from ``seed``."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = [sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for d in folders]
    multi = [i for i, fs in enumerate(files) if len(fs) >= 2]
    if len(folders) < 2 or not multi:
        raise ValueError(f"{root}: pairs need two identity folders and one with two or more images")
    g = streams.numpy_generator(seed, "verification_pairs")
    pairs = []
    for k in range(num_pairs):
        if k % 2 == 0:
            fs = files[multi[g.integers(len(multi))]]
            a, b = g.choice(len(fs), 2, replace=False)
            pairs.append((fs[a], fs[b], True))
        else:
            i, j = g.choice(len(folders), 2, replace=False)
            pairs.append((files[i][g.integers(len(files[i]))], files[j][g.integers(len(files[j]))], False))
    return pairs


def ten_fold_accuracy(distances, issame, thresholds=THRESHOLDS, folds: int = 10) -> dict:
    """insightface's ``calculate_roc`` accuracy: ``distances[n]`` (smaller = more alike; same when
    ``distance < threshold``). Returns ``accuracy`` (mean over folds), ``accuracy_std`` (population
    std), ``fold_accuracy`` and ``fold_threshold`` (the threshold each fold was judged with)."""
    d, y = np.asarray(distances, dtype=np.float64), np.asarray(issame, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if len(d) < folds:
        raise ValueError(f"{folds}-fold accuracy needs at least {folds} pairs, got {len(d)}")
    correct = (d[:, None] < thresholds[None, :]) == y[:, None]       # [n, thresholds]
    accs, chosen = [], []
    for test in np.array_split(np.arange(len(d)), folds):            # sklearn KFold(folds, shuffle=False)
        train = np.ones(len(d), dtype=bool)
        train[test] = False
        best = int(np.argmax(correct[train].mean(0)))
        chosen.append(float(thresholds[best]))
        accs.append(float(correct[test, best].mean()))
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "fold_accuracy": accs,
            "fold_threshold": chosen}


def verification_metrics(embeddings: torch.Tensor, issame, fars=(1e-3,)) -> dict:
    """The protocol's numbers from the flip-summed ``embeddings[2n, D]`` (rows 2i, 2i+1 = pair i):
    ``accuracy``, ``accuracy_std``, ``threshold`` (mean over the folds), ``tar_at_far_<far>``, ``pairs``."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=1)
    cos = (x[0::2] * x[1::2]).sum(1).numpy()
    folds = ten_fold_accuracy(2.0 - 2.0 * cos, issame)
    out = {"accuracy": folds["accuracy"], "accuracy_std": folds["accuracy_std"],
           "threshold": float(np.mean(folds["fold_threshold"])), "pairs": len(cos)}
    for far in fars:
        out[f"tar_at_far_{far:.0e}".replace("e-0", "e-")] = tar_at_far(cos, issame, far)[0]
    return out


@torch.no_grad()
def embed_pairs(backbone, vset: VerificationSet, input_shape, batch_size: int = 256, device="cpu",
                flip: bool = True, group=None) -> torch.Tensor:
    """``f(x) + f(flip(x))`` (``flip=False``: ``f(x)``) of every image of ``vset``: ``[2n, D]`` on every
    rank. Each rank of ``group`` decodes and embeds its slice; every rank must call."""
    channels, size = int(input_shape[0]), int(input_shape[-1])
    if len(input_shape) != 3 or input_shape[1] != size:
        raise ValueError(f"verification images are square [C, S, S]; the model takes {tuple(input_shape)}")
    part, sizes = _my_slice(2 * vset.num_pairs, get_rank(group), get_world_size(group))
    out = []
    for lo in range(part.start, max(part.stop, part.start + 1), batch_size):   # an empty slice gives [0, D]
        x = vset.images(lo, min(lo + batch_size, part.stop), size, channels)
        emb = embed(backbone, x, batch_size, device)
        out.append(emb + embed(backbone, x.flip(3), batch_size, device) if flip else emb)
    return gather_rows(torch.cat(out).to(device), sizes, group).cpu()


def evaluate_verification(backbone, sets: dict, input_shape, batch_size: int = 256, device="cpu",
                          group=None) -> dict:
    """``{name: verification_metrics}`` of each :class:`VerificationSet` of ``sets``; every rank must call."""
    return {name: verification_metrics(embed_pairs(backbone, vset, input_shape, batch_size, device, group=group),
                                       vset.issame)
            for name, vset in sets.items()}


__all__ = ["THRESHOLDS", "VerificationSet", "embed_pairs", "evaluate_verification", "load_verification_bin",
           "pairs_from_folder", "ten_fold_accuracy", "verification_metrics", "write_verification_bin"]
