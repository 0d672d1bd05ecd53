"""Image loading and preprocessing for inference, without torchvision.

Reproduces transformers' `BlipImageProcessor` (the Pillow backend `Blip2Processor` uses) step
for step, so the same file gives the same `pixel_values` bit for bit:
  1. convert to RGB; images with transparency are composited onto white first (as transformers
     does: `convert("RGB")` alone would turn transparent pixels black);
  2. resize to (height, width) with Pillow, bicubic by default, on the uint8 image;
  3. rescale: uint8 -> float64 * rescale_factor (1/255) -> float32;
  4. normalise per channel in float32: (x - mean) / std, CLIP mean/std by default.
Steps 3-4 use the same dtypes in the same order as transformers, which is what makes the
result identical rather than merely close (computing 4 in float64 would differ by ~1 ulp).
One deliberate difference: 16-bit greyscale images (Pillow modes I;16 and I) are scaled to 8
bits (65535 -> 255); `convert("RGB")`, which transformers uses, clips them, turning all but the
darkest pixels white.

Images over Pillow's decompression-bomb limit are refused with `ImageError`, never decoded.
`check_images` / `open_images` check or decode many files, returning the unreadable ones with
their reasons instead of stopping at the first (or raising it, with strict=True).

The settings come from the model folder's `preprocessor_config.json` (hub BLIP-2 folders) or
the `image_processor` entry of `processor_config.json` (what transformers 5 writes); without
either, CLIP defaults at the vision encoder's image size.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the file."""


@dataclass
class ImageSpec:
    """What preprocessing does; field names and meanings follow transformers' image processor."""
    height: int = 224
    width: int = 224
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_folder(cls, folder: str, default_size: int = 224) -> "ImageSpec":
        """Read the folder's image-processor settings; CLIP defaults at `default_size` otherwise."""
        cfg = _image_processor_dict(folder)
        size = cfg.get("size") or {}
        if isinstance(size, int):  # very old configs store one int for a square
            size = {"height": size, "width": size}
        if "shortest_edge" in size and "height" not in size:
            # BLIP-2 never uses aspect-preserving resizes; refusing is better than guessing
            raise ImageError(f"{folder}: image processor size {size} (shortest_edge) is not supported; "
                             f"BLIP-2 resizes to a fixed height and width")
        return cls(height=int(size.get("height", default_size)), width=int(size.get("width", default_size)),
                   image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)), image_std=tuple(cfg.get("image_std", CLIP_STD)),
                   resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   do_resize=bool(cfg.get("do_resize", True)), do_rescale=bool(cfg.get("do_rescale", True)),
                   do_normalize=bool(cfg.get("do_normalize", True)))


def _image_processor_dict(folder: str) -> dict:
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ImageError(f"{path}: cannot read the image processor settings ({err})") from None
        d = d.get(key) if key else d
        if isinstance(d, dict):
            return d
    return {}


def _bomb_message(path: str, err: Exception) -> str:
    return (f"{path}: image too large to decode safely ({err}); Pillow's limit is "
            f"{Image.MAX_IMAGE_PIXELS} pixels")


def open_image(path: str) -> Image.Image:
    """Open and fully decode an image file; `ImageError` naming the file if that fails."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image file")
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file fails here, not halfway through a batch
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as err:
        raise ImageError(_bomb_message(path, err)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # Pillow's decoders raise all of these
        raise ImageError(f"{path}: cannot read the image ({err})") from None
    return img


def check_image(path: str) -> None:
    """Cheap early check (header only) so a bad file is reported before a model is loaded."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image file")
    try:
        with Image.open(path):
            pass
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as err:
        raise ImageError(_bomb_message(path, err)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"{path}: cannot read the image ({err})") from None


def _each(paths: list[str], read, strict: bool) -> tuple[list[str], list, list[ImageError]]:
    """`read(path)` for each path: (the paths it succeeded on, its results, an `ImageError` for each
    other one); strict raises the first error instead."""
    good, results, bad = [], [], []
    for path in paths:
        try:
            result = read(path)
        except ImageError as err:
            if strict:
                raise
            bad.append(err)
        else:
            good.append(path)
            results.append(result)
    return good, results, bad


def check_images(paths: list[str], strict: bool = True) -> tuple[list[str], list[ImageError]]:
    """Header-check each file: (the readable paths, an `ImageError` for each other one).
    strict: raise the first error instead, as `check_image` does."""
    good, _, bad = _each(paths, check_image, strict)
    return good, bad


def open_images(paths: list[str], strict: bool = True) -> tuple[list[str], list[Image.Image], list[ImageError]]:
    """Decode each file: (the decoded paths, their images, an `ImageError` for each other one).
    strict: raise the first error instead."""
    return _each(paths, open_image, strict)


WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit_grey(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (I;16*, or I as Pillow gives 16-bit PNGs and TIFFs) as mode L,
    scaled by 255/65535 with rounding; a transparent grey level is scaled alike."""
    levels = np.asarray(img, dtype=np.float64)
    grey = Image.fromarray(np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8), "L")
    transparency = img.info.get("transparency")
    if isinstance(transparency, int):
        grey.info["transparency"] = int(np.clip(round(transparency / 257.0), 0, 255))
    return grey


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers' `convert_to_rgb`);
    16-bit greyscale is first scaled to 8 bits (`to_8bit_grey`) rather than clipped."""
    if img.mode in WIDE_GREY_MODES:
        img = to_8bit_grey(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(images: list[Image.Image], spec: ImageSpec) -> torch.Tensor:
    """PIL images (any sizes and modes) -> pixel_values (B, 3, H, W) float32."""
    if not images:
        raise ValueError("preprocess: no images given")
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    out = []
    for img in images:
        img = to_rgb(img)
        if spec.do_resize:
            img = img.resize((spec.width, spec.height), resample=spec.resample)
        x = np.asarray(img)  # (H, W, 3) uint8
        if spec.do_rescale:
            x = (x.astype(np.float64) * spec.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if spec.do_normalize:
            x = (x - mean) / std
        out.append(x.transpose(2, 0, 1))  # (3, H, W)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:  # only possible with do_resize False
        raise ValueError(f"images of different sizes {sorted(shapes)} cannot form one batch without resizing")
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


def load_images(paths: list[str], spec: ImageSpec) -> torch.Tensor:
    """Files -> pixel_values (B, 3, H, W); `ImageError` naming the first unreadable file."""
    return preprocess([open_image(p) for p in paths], spec)


__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageError", "ImageSpec", "open_image", "check_image", "check_images",
           "open_images", "to_8bit_grey", "to_rgb", "preprocess", "load_images"]
