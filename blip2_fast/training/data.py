"""Training data pipeline: records -> augmented image tensors -> resumable, rank-sharded batches.

- `read_records` / `Record` / `SkipLog` / `DataError` (from `data_sources`): the sources.
- `ImageTransform`: eval = `blip2_fast.images.preprocess` exactly (bicubic resize, 1/255, CLIP
  mean/std); train adds RandomResizedCrop and a horizontal flip, drawing only from the
  generator it is given.
- `PairDataset`: map-style; sample i's augmentation comes from a numpy generator seeded with
  (seed, epoch, i), so it does not depend on which DataLoader worker loads it, nor on a resume.
  An unreadable image is replaced by the next record (reported in the item's "skipped"), which
  keeps every batch full: DDP gathers need equal batch shapes on every rank.
- `ResumableSampler`: seeded per-epoch permutation, rank sharding, and a position that the
  training loop moves with `advance()` only for batches it has trained on (DataLoader prefetch
  runs ahead of training, so "yielded" is not "consumed").
- `TextCollator`, `make_loader`: generic batching helpers (tokenisation: `blip2_fast.tokenizers`).
"""
from __future__ import annotations

import io
import logging
import math
import random
import tarfile

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..images import CLIP_MEAN, CLIP_STD, ImageError, ImageSpec, open_image, preprocess, to_rgb
from .data_sources import TAR_PREFIX, DataError, Record, SkipLog, expand_source, read_records

logger = logging.getLogger(__name__)
MAX_TRIES = 16
_SHARD_INDEX: dict[str, dict[str, tuple[int, int]]] = {}  # per process: shard -> member -> (offset, size)


def _split_tar_url(url: str) -> tuple[str, str]:
    """"tar://<shard>.tar#<member>" -> (shard, member); split after ".tar#" since '#' may occur in names."""
    at = url.lower().find(".tar#")
    if not url.startswith(TAR_PREFIX) or at < 0:
        raise ImageError(f"{url}: not a tar member reference (tar://<shard>.tar#<member>)")
    return url[len(TAR_PREFIX): at + 4], url[at + 5:]


def read_image_bytes(record: Record) -> bytes:
    """The raw bytes of a record's image: the file, or the tar member via open + seek + read."""
    if not record.image.startswith(TAR_PREFIX):
        with open(record.image, "rb") as f:
            return f.read()
    shard, member = _split_tar_url(record.image)
    offset, size = record.offset, record.size
    if offset < 0:  # a Record built by hand: index the shard once per process
        if shard not in _SHARD_INDEX:
            try:
                with tarfile.open(shard, mode="r:") as tar:
                    _SHARD_INDEX[shard] = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
            except (tarfile.TarError, OSError) as err:
                raise ImageError(f"{record.image}: cannot index the shard ({err})") from None
        if member not in _SHARD_INDEX[shard]:
            raise ImageError(f"{record.image}: no such member in the shard")
        offset, size = _SHARD_INDEX[shard][member]
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as err:
        raise ImageError(f"{record.image}: cannot read the shard ({err})") from None
    if len(data) != size:
        raise ImageError(f"{record.image}: shard truncated ({len(data)} of {size} bytes at offset {offset})")
    return data


def load_record_image(record: Record) -> Image.Image:
    """Decoded PIL image of a record; `ImageError` naming the file or tar member on failure."""
    if not record.image.startswith(TAR_PREFIX):
        return open_image(record.image)
    data = read_image_bytes(record)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now so a corrupt member fails here, inside the retry loop
    except UnidentifiedImageError:
        raise ImageError(f"{record.image}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:  # as open_image
        raise ImageError(f"{record.image}: cannot read the image ({err})") from None
    return img


class _Draws:
    """Uniform draws from a numpy or a torch Generator (the only sources of randomness)."""

    def __init__(self, gen):
        if not isinstance(gen, (np.random.Generator, torch.Generator)):
            raise TypeError(f"generator must be a numpy.random.Generator or torch.Generator, got {type(gen).__name__}")
        self.gen = gen

    def uniform(self, lo: float, hi: float) -> float:
        if isinstance(self.gen, np.random.Generator):
            return float(self.gen.uniform(lo, hi))
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen, dtype=torch.float64))

    def integer(self, lo: int, hi: int) -> int:  # in [lo, hi)
        if isinstance(self.gen, np.random.Generator):
            return int(self.gen.integers(lo, hi))
        return int(torch.randint(lo, hi, (), generator=self.gen))


def random_resized_crop_box(width: int, height: int, scale, ratio, draws: _Draws) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a RandomResizedCrop: area fraction in `scale`, aspect w/h
    log-uniform in `ratio`; 10 attempts, then a centre crop with the aspect clamped to `ratio`
    (the standard algorithm, so augmentation statistics match the reference recipes)."""
    area, log_r = width * height, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * draws.uniform(scale[0], scale[1])
        aspect = math.exp(draws.uniform(*log_r))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = draws.integer(0, width - w + 1), draws.integer(0, height - h + 1)
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageTransform:
    """PIL image -> (3, S, S) float32. train=False: exactly `preprocess` with ImageSpec(S, S).
    train=True: RandomResizedCrop(scale, ratio 3/4..4/3) before that, then a horizontal flip
    with probability 0.5 when hflip; randomness only from the generator passed to __call__."""

    RATIO = (3 / 4, 4 / 3)

    def __init__(self, size: int, train: bool = False, scale=(0.5, 1.0), hflip: bool = True,
                 mean=CLIP_MEAN, std=CLIP_STD):
        if size < 1 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"ImageTransform: need size >= 1 and 0 < scale[0] <= scale[1] <= 1, "
                             f"got size={size}, scale={scale}")
        self.size, self.train, self.scale, self.hflip = int(size), bool(train), tuple(scale), bool(hflip)
        self.spec = ImageSpec(height=self.size, width=self.size, image_mean=tuple(mean), image_std=tuple(std))

    def __call__(self, img: Image.Image, generator=None) -> torch.Tensor:
        if not self.train:
            return preprocess([img], self.spec)[0]
        if generator is None:
            raise ValueError("ImageTransform(train=True) needs a generator, so that augmentation is reproducible")
        draws = _Draws(generator)
        img = to_rgb(img)
        img = img.crop(random_resized_crop_box(img.width, img.height, self.scale, self.RATIO, draws))
        x = preprocess([img], self.spec)[0]  # (3, S, S)
        # flipping the normalised tensor equals flipping the image: normalisation is per channel
        if self.hflip and draws.uniform(0.0, 1.0) < 0.5:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, train={self.train}, scale={self.scale}, hflip={self.hflip})"


class PairDataset(torch.utils.data.Dataset):
    """Map-style: item i -> dict(pixel_values (3,S,S), text, question, index, skipped).

    `index` is the record actually used; `skipped` lists "unreadable image: <path>: <error>"
    for records passed over on the way (i, i+1, ... mod n; at most 16 tries, then DataError).
    """

    def __init__(self, records: list[Record], transform, seed: int = 0):
        if not records:
            raise DataError("PairDataset: no records")
        if seed < 0:
            raise ValueError(f"PairDataset: seed must be >= 0, got {seed}")
        self.records, self.transform, self.seed, self.epoch = list(records), transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"PairDataset.set_epoch: epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        n = len(self.records)
        if not 0 <= i < n:
            raise IndexError(f"PairDataset index {i} out of range [0, {n})")
        skipped = []
        for t in range(min(MAX_TRIES, n)):
            j = (i + t) % n
            rec = self.records[j]
            try:
                img = load_record_image(rec)
            except ImageError as err:
                skipped.append(f"unreadable image: {err}")
                logger.warning("record %d skipped: unreadable image: %s", j, err)
                continue
            gen = np.random.default_rng([self.seed, self.epoch, i])
            return dict(pixel_values=self.transform(img, gen), text=rec.text, question=rec.question,
                        index=j, skipped=skipped)
        raise DataError(f"PairDataset item {i}: {len(skipped)} consecutive records unreadable: "
                        + "; ".join(skipped[:3]))


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded, rank-sharded sampling whose position can be checkpointed.

    Epoch e's order is torch.randperm(n) with a generator seeded seed + e (arange when not
    shuffle). It is then cut to a multiple of world_size * batch_size: drop_last=True drops
    the tail, drop_last=False pads by wrapping round to the start of the order; either way each
    rank gets the same number of full batches. Rank r takes order[r::world_size].

    `position` counts this rank's indices consumed in the epoch; only `advance(k)` moves it
    (iteration does not), and iteration yields from `position` to the end of the epoch.
    len() is what iteration would yield now; `epoch_length` is the full per-rank epoch.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, batch_size: int = 1):
        if n < 1 or world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"ResumableSampler: need n >= 1, batch_size >= 1, 0 <= rank < world_size; "
                             f"got n={n}, batch_size={batch_size}, rank={rank}, world_size={world_size}")
        chunk = world_size * batch_size
        total = n // chunk * chunk if drop_last else -(-n // chunk) * chunk
        if total == 0:
            raise ValueError(f"ResumableSampler: {n} examples cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks with drop_last=True; use drop_last=False or more data")
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, int(seed), shuffle, rank, world_size
        self.drop_last, self.batch_size, self.total = drop_last, batch_size, total
        self.epoch_length = total // world_size
        self.epoch, self.position = 0, 0

    def epoch_order(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for an epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.n)
        order = order[torch.arange(self.total) % self.n]  # cut (drop_last) or wrap-pad
        return order[self.rank::self.world_size].tolist()

    def __iter__(self):
        order, start = self.epoch_order(), self.position
        return iter(order[start:])

    def __len__(self) -> int:
        return self.epoch_length - self.position

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def advance(self, k: int) -> None:
        if k < 0 or self.position + k > self.epoch_length:
            raise ValueError(f"ResumableSampler.advance({k}): position {self.position} + {k} outside "
                             f"[0, {self.epoch_length}] (this rank's epoch length)")
        self.position += k

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, d: dict) -> None:
        missing = [k for k in ("epoch", "position") if k not in d]
        if missing:
            raise KeyError(f"ResumableSampler.load_state_dict: missing key(s) {missing}")
        if not 0 <= int(d["position"]) <= self.epoch_length:
            raise ValueError(f"ResumableSampler.load_state_dict: position {d['position']} outside "
                             f"[0, {self.epoch_length}] (saved with another dataset size or world size?)")
        self.epoch, self.position = int(d["epoch"]), int(d["position"])


class TextCollator:
    """Items -> dict(pixel_values (B,3,S,S), texts, questions, indices (B,) long, skipped (int),
    skip_reasons (list[str])). questions: None when no item has one, else one per item, None for
    a caption (a "vqa+caption" finetune mixes both). No tokenisation: model collators add that."""

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("TextCollator: empty batch")
        shapes = {tuple(it["pixel_values"].shape) for it in items}
        if len(shapes) > 1:
            raise ValueError(f"TextCollator: pixel_values of different shapes {sorted(shapes)} in one batch")
        questions = [it["question"] for it in items]
        reasons = [r for it in items for r in it["skipped"]]
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "texts": [it["text"] for it in items], "questions": questions if any(q is not None for q in questions) else None,
                "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
                "skipped": len(reasons), "skip_reasons": reasons}


def _seed_worker(worker_id: int) -> None:
    # DataLoader derives each worker's torch seed from its generator; derive the others from it
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, sampler, batch_size: int, num_workers: int = 0, collate_fn=None,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A non-persistent DataLoader (each iter() restarts from the sampler's position) with
    deterministic worker seeding; drop_last follows the sampler."""
    if getattr(sampler, "batch_size", batch_size) != batch_size:
        raise ValueError(f"make_loader: batch_size {batch_size} differs from the sampler's {sampler.batch_size}, "
                         f"which pads the epoch to whole batches of its size")
    if getattr(sampler, "n", len(dataset)) != len(dataset):
        raise ValueError(f"make_loader: sampler is for {sampler.n} examples, the dataset has {len(dataset)}")
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=collate_fn or TextCollator(), pin_memory=pin_memory,
        drop_last=getattr(sampler, "drop_last", False), persistent_workers=False,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(getattr(sampler, "seed", 0)))


__all__ = ["DataError", "Record", "SkipLog", "read_records", "expand_source", "read_image_bytes",
           "load_record_image", "random_resized_crop_box", "ImageTransform", "PairDataset",
           "ResumableSampler", "TextCollator", "make_loader"]
