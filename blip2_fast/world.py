"""A synthetic "world of shapes": images, captions and questions to train a miniature BLIP-2.

A scene is a square image with a uniform background (black, gray or white, light Gaussian
pixel noise) and one or two objects. Each object has a shape (circle, square, triangle,
star), a colour (red, green, blue, yellow, purple, orange) and a size class, and fills a
square bounding box stored as fractions of the image side, so a scene is independent of the
resolution it is rendered at.

Sizes (bounding-box side / image side):
- small: 0.20-0.30, always.
- large: 0.40-0.55 when the object is alone. With two objects each one must fit inside its
  own half (0.5 of the side) with a 0.02 margin to the image edge and to the midline, so a
  paired large object is capped at 0.46: its range is 0.40-0.46, not 0.40-0.55. Small and
  large therefore never overlap in size, and two objects never overlap each other.

Colours: fixed, mutually distinct RGB values, and every object gets a 2-pixel (at 224 px)
outline in its own colour at 45% brightness. The dark outline keeps light colours (yellow,
orange) readable on white; it stays far from every background (more than 60 levels in some channel, checked
in the tests), so on black too the object's full extent is visible and measurable.

Geometry: circle inscribed in its box, square filling it, triangle with its apex at the top
centre and its base on the bottom edge, five-pointed star (inner/outer radius 0.45) stretched
to fill its box (the regular star is ~5% wider than tall; filling the box keeps "size" honest).

Captions: "a {size} {color} {shape}" or "a {size} {color} {shape} on the left and a {size}
{color} {shape} on the right". Questions: see `questions`.

The training core reads one JSON record per line with the keys "image" and "caption" (see
`generate_dataset`). CLI: python -m blip2_fast.world --out DIR --n N --seed S --resolution R
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import zlib
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {  # chosen pairwise distinct and away from all three backgrounds
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 80, 230),
    "yellow": (245, 210, 20), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
SIZE_RANGE = {"small": (0.20, 0.30), "large": (0.40, 0.55)}
PAIRED_LARGE_RANGE = (0.40, 0.46)  # 0.5 half - 2 * MARGIN: a large object fits in its half
MARGIN = 0.02                      # gap to the image edge and to the vertical midline
CENTRE_JITTER = 0.10               # max offset of a lone object's centre from the image centre
VERTICAL_JITTER = 0.15             # max offset of a paired object's centre from mid-height
OUTLINE_SHADE = 0.45
NOISE_STD = 3.0                    # "light" noise: far below the object/background contrast
NUMBER_WORDS = {1: "one", 2: "two"}


@dataclass(frozen=True)
class SceneObject:
    """One object; bbox = (x0, y0, x1, y1) in fractions of the image side, x1/y1 exclusive."""
    shape: str
    color: str
    size: str
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """Background name and one or two objects; with two, objects[0] is the left one."""
    background: str
    objects: tuple[SceneObject, ...]


def _pick(rng: np.random.Generator, options) -> str:
    """Uniform choice returning a plain str (rng.choice would return numpy.str_)."""
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _box(rng, shape, color, size, side, x_lo, x_hi, y_lo, y_hi) -> SceneObject:
    """Place a side x side box with x0 uniform in [x_lo, x_hi] and y0 in [y_lo, y_hi]."""
    x0, y0 = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
    return SceneObject(shape, color, size, (float(x0), float(y0), float(x0 + side), float(y0 + side)))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: background, 1 or 2 objects (equally likely), sizes, positions."""
    background = _pick(rng, BACKGROUNDS)
    n = 1 + int(rng.integers(2))
    objects = []
    for i in range(n):
        shape, color, size = _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZE_RANGE)
        lo, hi = PAIRED_LARGE_RANGE if (n == 2 and size == "large") else SIZE_RANGE[size]
        side = rng.uniform(lo, hi)
        if n == 1:  # roughly centred: the centre moves at most CENTRE_JITTER each way
            c_lo, c_hi = 0.5 - CENTRE_JITTER - side / 2, 0.5 + CENTRE_JITTER - side / 2
            objects.append(_box(rng, shape, color, size, side, c_lo, c_hi, c_lo, c_hi))
        else:  # left half is [0, 0.5), right half [0.5, 1): keep MARGIN from edges and midline
            x_lo = MARGIN + 0.5 * i
            x_hi = 0.5 * (i + 1) - MARGIN - side
            y_lo = max(MARGIN, 0.5 - VERTICAL_JITTER - side / 2)
            y_hi = min(1 - MARGIN - side, 0.5 + VERTICAL_JITTER - side / 2)
            objects.append(_box(rng, shape, color, size, side, x_lo, x_hi, y_lo, y_hi))
    return Scene(background, tuple(objects))


def _star_unit(inner: float = 0.45) -> list[tuple[float, float]]:
    """Ten vertices of a five-pointed star, point up, normalised to fill the unit square."""
    pts = [((inner if k % 2 else 1.0) * math.sin(k * math.pi / 5),
            -(inner if k % 2 else 1.0) * math.cos(k * math.pi / 5)) for k in range(10)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]


_UNIT_POLYGONS = {"triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)], "star": _star_unit()}


def render(scene: Scene, resolution: int = 224, rng: np.random.Generator | None = None,
           noise_std: float = NOISE_STD) -> Image.Image:
    """Draw `scene` as a resolution x resolution RGB image; Gaussian noise only when rng is given."""
    img = Image.new("RGB", (resolution, resolution), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    width = max(1, round(resolution / 112))  # outline: 2 px at 224, 1 px at 64
    for obj in scene.objects:
        fill = COLORS[obj.color]
        outline = tuple(round(c * OUTLINE_SHADE) for c in fill)
        # PIL boxes are inclusive, so the last covered pixel is round(x1 * R) - 1.
        x0, y0 = round(obj.bbox[0] * resolution), round(obj.bbox[1] * resolution)
        x1, y1 = round(obj.bbox[2] * resolution) - 1, round(obj.bbox[3] * resolution) - 1
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline, width=width)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=width)
        else:
            pts = [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in _UNIT_POLYGONS[obj.shape]]
            draw.polygon(pts, fill=fill, outline=outline, width=width)
    if rng is None or noise_std <= 0:
        return img
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise_std, (resolution, resolution, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _describe(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.color} {obj.shape}"


def caption(scene: Scene) -> str:
    """The scene's one true caption (see the module docstring for the two templates)."""
    if len(scene.objects) == 1:
        return _describe(scene.objects[0])
    left, right = scene.objects
    return f"{_describe(left)} on the left and {_describe(right)} on the right"


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every applicable (question, answer) pair, in a fixed order of types:

    - "what color is the {shape}?" for each shape that appears exactly once;
    - "what shape is on the left?" / "... on the right?" for two-object scenes;
    - "how many shapes are there?" -> "one" / "two";
    - "is there a {color} {shape}?": exactly one "yes" (a present object) and one "no" per
      scene, in random order, so yes/no is balanced over any dataset. The "no" is a hard
      negative: a present object with its colour or its shape changed, never a present pair.
    """
    objs = scene.objects
    shapes = [o.shape for o in objs]
    qa = [(f"what color is the {o.shape}?", o.color) for o in objs if shapes.count(o.shape) == 1]
    if len(objs) == 2:
        qa += [("what shape is on the left?", objs[0].shape), ("what shape is on the right?", objs[1].shape)]
    qa.append(("how many shapes are there?", NUMBER_WORDS[len(objs)]))
    present = {(o.color, o.shape) for o in objs}
    yes = objs[int(rng.integers(len(objs)))]
    while True:  # terminates quickly: at most 2 of the 24 (colour, shape) pairs are present
        base = objs[int(rng.integers(len(objs)))]
        if rng.random() < 0.5:
            neg = (_pick(rng, [c for c in COLORS if c != base.color]), base.shape)
        else:
            neg = (base.color, _pick(rng, [s for s in SHAPES if s != base.shape]))
        if neg not in present:
            break
    pair = [(f"is there a {yes.color} {yes.shape}?", "yes"), (f"is there a {neg[0]} {neg[1]}?", "no")]
    if rng.random() < 0.5:
        pair.reverse()
    return qa + pair


_OBJ = rf"a\s+({'|'.join(SIZE_RANGE)})\s+({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})"
_ONE_RE = re.compile(rf"^{_OBJ}$")
_TWO_RE = re.compile(rf"^{_OBJ}\s+on\s+the\s+left\s+and\s+{_OBJ}\s+on\s+the\s+right$")


def parse_caption(text: str) -> list[dict] | None:
    """Inverse of `caption`: [{"size", "color", "shape"}, ...] (left first), or None.

    Case, surrounding/repeated whitespace and one trailing period are tolerated, since a
    generated caption may differ from the template in exactly those ways; anything else
    (unknown words, wrong order, partial captions) is rejected with None.
    """
    if not isinstance(text, str):
        return None
    text = " ".join(text.lower().split()).removesuffix(".").strip()
    m = _ONE_RE.match(text) or _TWO_RE.match(text)
    if m is None:
        return None
    g = m.groups()
    return [{"size": g[i], "color": g[i + 1], "shape": g[i + 2]} for i in range(0, len(g), 3)]


def caption_attributes_correct(pred_text: str, scene: Scene) -> bool:
    """True when `pred_text` parses and every object's size, colour, shape and side match."""
    parsed = parse_caption(pred_text)
    truth = [{"size": o.size, "color": o.color, "shape": o.shape} for o in scene.objects]
    return parsed == truth


def scene_rng(seed: int, index: int, split: str = "train") -> np.random.Generator:
    """Independent stream per sample: any prefix of a dataset is the same for a larger n,
    and the split name is mixed in so train and val drawn with one seed differ."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def scene_record(scene: Scene) -> list[dict]:
    """JSON-ready description of the objects (bbox in fractions of the side)."""
    return [dict(asdict(o), bbox=[round(v, 6) for v in o.bbox]) for o in scene.objects]


def generate_dataset(out_dir: str, n: int, seed: int, resolution: int = 224, split: str = "train",
                     with_questions: bool = True) -> str:
    """Write n PNGs to out_dir/images/{split}_{i:06d}.png and out_dir/{split}.jsonl; return the
    JSONL path. Each line: {"image": path relative to out_dir, "caption", "questions":
    [{"question", "answer"}], "objects", "background"}; "image" and "caption" are the
    training-core format. The same (seed, split, resolution) gives byte-identical files."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    jsonl = os.path.join(out_dir, f"{split}.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in tqdm(range(n), desc=f"world {split}", unit="img", disable=n < 500):
            rng = scene_rng(seed, i, split)
            scene = sample_scene(rng)
            rel = f"images/{split}_{i:06d}.png"
            render(scene, resolution, rng).save(os.path.join(out_dir, rel), format="PNG")
            qa = questions(scene, rng) if with_questions else []
            rec = {"image": rel, "caption": caption(scene),
                   "questions": [{"question": q, "answer": a} for q, a in qa],
                   "objects": scene_record(scene), "background": scene.background}
            f.write(json.dumps(rec) + "\n")
    return jsonl


def main(out: str, n: int, seed: int = 0, resolution: int = 224, split: str = "train",
         with_questions: bool = True) -> str:
    path = generate_dataset(out, n, seed, resolution, split, with_questions)
    print(path)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Generate a world-of-shapes image/caption/QA dataset.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--split", default="train")
    p.add_argument("--no-questions", dest="with_questions", action="store_false")
    main(**vars(p.parse_args()))
