"""On-disk cache of the frozen ViT's outputs for stage 2 without image augmentation.

With a frozen image encoder and fixed preprocessing, every epoch recomputes the same
(S, E) image tokens per record; the ViT is most of stage 2's forward cost (ViT-g: ~1B
parameters, against a Q-Former of ~100M). Compute them once, then train from
`image_embeds` (`Blip2Stage2.forward(image_embeds=...)`).

Layout of a cache folder:
  shard-00000.safetensors ...   "features" (N, S, E) in the cache dtype, "indices" (N,) int64 record
                                indices; metadata: format, fingerprint, image_size
  manifest.json                 format, fingerprint, image_size, token shape, dtype, shard list;
                                written last: a folder without it is an incomplete build
Every file is written to a temporary name in the folder and moved into place with os.replace,
and a rebuild removes the old manifest first, so a crash never leaves a file that looks complete.

The fingerprint (sha256 of the vision config, each tensor's name/shape/dtype and 64 values
sampled from it) changes with any other checkpoint, finetuning step or weight dtype; opening a
cache with a `vision_model` whose fingerprint differs is an error.

Rows are looked up by record index, so the cache is also keyed by the data: `data_fingerprint`
hashes, in record order, each record's image path with its size and modification time (a tar
member: the shard's, plus the member's offset and size) and the preprocessing. Opening a cache
with a `data_key` that differs from the one it was built with is an error too: another data set
in the same --out, an image rewritten in place, another image size, never the old features.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import torch

from ..atomic import write_file
from ..fingerprint import config_bytes, weights_fingerprint

log = logging.getLogger("blip2_fast")
FORMAT = "blip2_fast.vision_cache.v1"
MANIFEST = "manifest.json"


class FeatureCacheError(ValueError):
    """A cache folder that cannot be used; the message names the file and the problem."""


def vision_fingerprint(vision_model: torch.nn.Module) -> str:
    """The weights fingerprint of the frozen vision model together with its config."""
    cfg = vision_model.config
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "extra"}
    return weights_fingerprint([config_bytes(fields)], vision_model.state_dict())


def _file_stamp(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except OSError:  # unreadable now: the dataset will skip it, and the key records that
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def data_fingerprint(records, transform) -> str:
    """sha256 over the records in order (image path, size, mtime; for a tar member its shard's
    stamp and its offset and size) and the preprocessing (`repr(transform)` and its image spec)."""
    from .data_sources import TAR_PREFIX

    digest = hashlib.sha256(repr((transform, getattr(transform, "spec", None))).encode())
    for record in records:
        if record.image.startswith(TAR_PREFIX):
            shard = record.image[len(TAR_PREFIX):].split(".tar#", 1)[0] + ".tar"
            stamp = _file_stamp(shard) + [record.offset, record.size]
        else:
            stamp = _file_stamp(record.image)
        digest.update(json.dumps([record.image, stamp]).encode())
    return digest.hexdigest()


def _collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "pixel_values" not in item or "index" not in item:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise FeatureCacheError(f"dataset item {i} of a batch has {keys}: expected a dict with "
                                    f"'pixel_values' and 'index'")
    return (torch.stack([torch.as_tensor(it["pixel_values"]) for it in items]),
            torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
            [str(s) for it in items for s in _notes(it.get("skipped"))])


def _notes(skipped) -> list:
    """An item's 'skipped' entry: PairDataset's list of "unreadable image: ..." strings."""
    if not skipped:
        return []
    return [skipped] if isinstance(skipped, str) else list(skipped) if isinstance(skipped, (list, tuple)) else []


@torch.no_grad()
def build_vision_cache(vision_model, dataset, path: str, batch_size: int, dtype: torch.dtype = torch.float16,
                       records_per_shard: int = 1024, num_workers: int = 0, data_key: str | None = None) -> str:
    """Run `vision_model` (on its own device, eval mode) over a map-style dataset of dicts with
    'pixel_values' (3, H, W) and 'index', in order; write the cache folder `path`. Returns path.
    `data_key` (`data_fingerprint` of the dataset's records) is stored for `VisionFeatureCache`.

    An index seen again (PairDataset serves the next readable record in place of an unreadable
    one, under that record's index) is the same record: it is cached once, and the repeats are
    counted and logged; the items' 'skipped' notes are logged and kept in the manifest."""
    if batch_size < 1 or records_per_shard < 1:
        raise ValueError(f"batch_size and records_per_shard must be >= 1, got {batch_size}, {records_per_shard}")
    if len(dataset) == 0:
        raise FeatureCacheError("the dataset is empty: nothing to cache")
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, MANIFEST)):
        os.remove(os.path.join(path, MANIFEST))  # the old cache stops being valid before any shard changes
    fingerprint = vision_fingerprint(vision_model)
    device = next(vision_model.parameters()).device
    was_training = vision_model.training
    vision_model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate)
    shards, feats, idxs, seen, image_size, pending = [], [], [], set(), None, 0
    repeats, skipped = 0, []

    def write_shard(features: torch.Tensor, indices: torch.Tensor) -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {"features": features.contiguous(), "indices": indices.contiguous()}
        meta = {"format": FORMAT, "fingerprint": fingerprint, "image_size": json.dumps(image_size)}
        write_file(os.path.join(path, name), lambda tmp: save_file(tensors, tmp, metadata=meta))
        shards.append({"file": name, "records": int(indices.numel())})

    try:
        for pixels, index, notes in loader:
            size, ids = list(pixels.shape[-2:]), index.tolist()
            if image_size is None:
                image_size = size
            elif size != image_size:
                raise FeatureCacheError(f"records {ids} have images of {size}, earlier ones {image_size}: "
                                        f"one cache holds one image size")
            skipped += notes
            keep = []
            for row, i in enumerate(ids):
                if i not in seen:
                    seen.add(i)
                    keep.append(row)
            repeats += len(ids) - len(keep)
            if not keep:
                continue
            if len(keep) < len(ids):
                pixels, index = pixels[keep], index[keep]
            feats.append(vision_model(pixels.to(device)).to(dtype).cpu())  # (b, S, E)
            idxs.append(index)
            pending += len(keep)
            while pending >= records_per_shard:  # a batch may straddle a shard boundary
                f, i = torch.cat(feats), torch.cat(idxs)
                write_shard(f[:records_per_shard], i[:records_per_shard])
                feats[:], idxs[:] = [f[records_per_shard:]], [i[records_per_shard:]]
                pending -= records_per_shard
        if pending:
            write_shard(torch.cat(feats), torch.cat(idxs))
    finally:
        vision_model.train(was_training)
    if repeats or skipped:
        log.warning("vision cache %s: %d repeated record indices cached once; %d unreadable records skipped "
                    "by the dataset%s", path, repeats, len(skipped), f" (first: {skipped[0]})" if skipped else "")
    manifest = {"format": FORMAT, "fingerprint": fingerprint, "data": data_key, "image_size": image_size,
                "dtype": str(dtype), "records": len(seen), "repeated_indices": repeats, "skipped": skipped,
                "shards": shards}
    write_file(os.path.join(path, MANIFEST), lambda tmp: _write_json(tmp, manifest))
    # shards of an older, larger build are no longer listed: remove them
    listed = {s["file"] for s in shards}
    for name in os.listdir(path):
        if name.startswith("shard-") and name.endswith(".safetensors") and name not in listed:
            os.remove(os.path.join(path, name))
    log.info("vision cache %s: %d records in %d shards", path, len(seen), len(shards))
    return path


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


class VisionFeatureCache:
    """Read side: `cache[record_index]` -> (S, E) image tokens in the cache dtype; `batch(indices)`
    -> (B, S, E). With `vision_model`, its fingerprint must match the cache's; with `data_key`,
    the data it was built from must be that. Shards are read lazily through safetensors slices
    (one row at a time, memory-mapped); picklable for DataLoader workers (open handles are not
    carried)."""

    def __init__(self, path: str, vision_model=None, data_key: str | None = None):
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            raise FeatureCacheError(f"{path}: no {MANIFEST}: not a vision cache, or its build did not finish "
                                    f"(rebuild it with build_vision_cache)")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except json.JSONDecodeError as err:
            raise FeatureCacheError(f"{manifest_path}: not valid JSON ({err})") from None
        found = manifest.get("format") if isinstance(manifest, dict) else None
        if found != FORMAT:
            raise FeatureCacheError(f"{manifest_path}: format {found!r}, expected {FORMAT!r}")
        self.path, self.fingerprint = path, manifest["fingerprint"]
        self.image_size = manifest["image_size"]
        self.skipped = manifest.get("skipped", [])  # the dataset's notes on unreadable records
        if vision_model is not None:
            mine = vision_fingerprint(vision_model)
            if mine != self.fingerprint:
                raise FeatureCacheError(f"{path} was built by other vision weights (fingerprint "
                                        f"{self.fingerprint[:12]}..., this vision model {mine[:12]}...): "
                                        f"rebuild the cache for this model")
        if data_key is not None and manifest.get("data") != data_key:
            raise FeatureCacheError(f"{path} was built from other data (data key {str(manifest.get('data'))[:12]}..., "
                                    f"this run's {data_key[:12]}...: other records, images changed since, or "
                                    f"another image size): rebuild the cache for this data")
        self._files = [os.path.join(path, s["file"]) for s in manifest["shards"]]
        self._where: dict[int, tuple[int, int]] = {}
        from safetensors import safe_open
        for shard, file in enumerate(self._files):
            try:
                with safe_open(file, framework="pt") as f:
                    meta = f.metadata() or {}
                    indices = f.get_tensor("indices").tolist()
            except Exception as err:
                raise FeatureCacheError(f"{file}: unreadable ({err}); rebuild the cache") from None
            if meta.get("fingerprint") != self.fingerprint:
                raise FeatureCacheError(f"{file}: shard fingerprint {meta.get('fingerprint', '?')[:12]}... differs "
                                        f"from the manifest's {self.fingerprint[:12]}...: mixed builds, rebuild")
            for row, idx in enumerate(indices):
                self._where[idx] = (shard, row)
        if len(self._where) != manifest.get("records", len(self._where)):
            raise FeatureCacheError(f"{path}: the shards hold {len(self._where)} records, the manifest says "
                                    f"{manifest['records']}: rebuild the cache")
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, record_index: int) -> bool:
        return int(record_index) in self._where

    @property
    def indices(self) -> list[int]:
        return sorted(self._where)

    def __getitem__(self, record_index: int) -> torch.Tensor:
        where = self._where.get(int(record_index))
        if where is None:
            raise KeyError(f"record {record_index} is not in the vision cache {self.path} ({len(self)} records)")
        shard, row = where
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open
            handle = self._handles[shard] = safe_open(self._files[shard], framework="pt")
        return handle.get_slice("features")[row]

    def batch(self, indices) -> torch.Tensor:
        """(B, S, E) for a batch's record indices (a tensor or a list)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()  # host tensor from the data pipeline
        return torch.stack([self[i] for i in indices])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


__all__ = ["build_vision_cache", "VisionFeatureCache", "FeatureCacheError", "vision_fingerprint", "data_fingerprint"]
