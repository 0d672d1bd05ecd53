"""Training data sources: JSONL, CSV, image folders and WebDataset-style tar shards -> Records.

`read_records` turns a source into a flat list of `Record`s (one per (image, caption), or one
per (image, question, answer) for task "vqa") with absolute image paths, and a `SkipLog` that
counts every example left out and why. Problems the user must fix (a malformed line, a
missing column, a source that does not exist) raise `DataError` naming file, line and key;
problems that only cost one example (missing image, empty text, image without a caption) are
counted skips, never silent ones. Captions and answers are stripped of surrounding whitespace
(a `.txt` caption usually ends with a newline).

Tar shards are indexed once here: for each image member we keep its data offset and size in
the shard, so `data.read_image_bytes` reads it with open + seek + read, and the dataset is
map-style (random access, exact resume) without a tarfile object per item. Only uncompressed
tars can be read that way. Members whose extension is neither an image, .txt nor .json
(WebDataset's .cls, .meta, ...) are ignored by design; a key with several image members uses
the first one in the shard.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass, field

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TASKS = ("caption", "vqa", "vqa+caption")
TAR_PREFIX = "tar://"


class DataError(ValueError):
    """A data problem the user can fix; the message names the file, line and key."""


@dataclass
class Record:
    """One training example; `image` is an absolute path or "tar://<shard path>#<member name>".

    `offset`/`size` locate a tar member's bytes in its shard (filled by `read_records`; -1
    means "look it up"); they take no part in comparisons.
    """
    image: str
    text: str
    question: str | None = None
    offset: int = field(default=-1, compare=False, repr=False)
    size: int = field(default=-1, compare=False, repr=False)


class SkipLog:
    """Counts of skipped examples per reason, with the first few examples of each."""

    def __init__(self, max_examples: int = 5):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.max_examples = max_examples

    def add(self, reason: str, example: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    def merge(self, other: "SkipLog") -> "SkipLog":
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(ex))])
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no examples skipped"
        parts = [f"{n} x {reason} (e.g. {', '.join(self.examples.get(reason, []))})"
                 for reason, n in sorted(self.counts.items())]
        return f"{self.total} examples skipped: " + "; ".join(parts)

    def log(self, logger) -> None:
        if self.total:
            logger.warning("%s", self.summary())

    def __repr__(self) -> str:
        return f"SkipLog({self.counts})"


def expand_source(pattern: str) -> list[str]:
    """Brace ({000..009}, {a,b}) then glob (*, ?, [..]) expansion; every result must exist."""
    paths = []
    for p in _expand_braces(pattern):
        if glob.has_magic(p):
            hits = sorted(glob.glob(p))
            if not hits:
                raise DataError(f"{p}: pattern matches no file")
            paths += hits
        else:
            paths.append(p)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(f"{pattern}: {len(missing)} source(s) do not exist, e.g. {missing[:3]}")
    return paths


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _expand_braces(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        a, b = r.groups()
        # bash rule: a leading zero on either end pads every number to the longer width
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-")[0] == "0" for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # "{x}" is literal text, as in bash
        return [head + "{" + body + "}" + p for p in _expand_braces(tail)]
    return [q for item in items for q in _expand_braces(head + item + tail)]


def read_records(source: str | list[str], task: str = "caption", root: str | None = None,
                 check_files: bool = True) -> tuple[list[Record], SkipLog]:
    """source: a .jsonl file, a .csv file, a folder of images with captions, or tar shards (a .tar
    path, a list of sources, or a brace/glob pattern like 'shards/{000..009}.tar', 'shards/*.tar').
    task "caption": one Record per (image, caption); "vqa": one per (image, question, answer);
    "vqa+caption" (a finetune that trains both, `TrainConfig.vqa_captions`): both of a JSONL
    object's or tar sample's caption (question None) and its questions, each one Record.
    root: base folder for relative image paths (default: the JSONL/CSV file's folder).
    check_files: skip ("missing image") records whose image file does not exist now."""
    if task not in TASKS:
        raise DataError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        paths = expand_source(source) if (_BRACE.search(source) or glob.has_magic(source)) else [source]
    else:
        paths = [q for s in source for q in expand_source(os.fspath(s))]
        if not paths:
            raise DataError("read_records: empty list of sources")
    records, skips = [], SkipLog()
    for path in paths:
        recs, sk = _read_one(path, task, root, check_files)
        records += recs
        skips.merge(sk)
    if not records:
        raise DataError(f"{source}: no usable record ({skips.summary()})")
    return records, skips


def _read_one(path: str, task: str, root: str | None, check_files: bool) -> tuple[list[Record], SkipLog]:
    if not os.path.exists(path):
        raise DataError(f"{path}: data source does not exist")
    if os.path.isdir(path):
        return _read_folder(path, task, root, check_files)
    low = path.lower()
    if low.endswith(".jsonl"):
        return _read_jsonl(path, task, root, check_files)
    if low.endswith(".csv"):
        return _read_csv(path, task, root, check_files)
    if low.endswith(".tar"):
        return _read_tar(path, task)
    raise DataError(f"{path}: unknown data source type (expected .jsonl, .csv, .tar or a folder)")


class _Builder:
    """Shared per-file logic: resolve and check the image path, skip empty texts."""

    def __init__(self, base: str, task: str, check_files: bool):
        self.base, self.task, self.check_files = os.path.abspath(base), task, check_files
        self.records: list[Record] = []
        self.skips = SkipLog()

    def add(self, where: str, image: str, pairs: list[tuple[str | None, str]], offset: int = -1, size: int = -1):
        """pairs: (question or None, text); one Record each unless skipped. tar:// images are
        not resolved or checked: the shard index found them."""
        if not image.startswith(TAR_PREFIX):
            image = os.path.normpath(os.path.join(self.base, image))
        for question, text in pairs:
            # vqa needs a question; vqa+caption takes None (a caption row) but not an empty one
            if self.task == "vqa":
                blank = not (question or "").strip()
            else:
                blank = question is not None and not question.strip()
            if not text.strip() or (self.task != "caption" and blank):
                self.skips.add("empty text", where)
            elif self.check_files and not image.startswith(TAR_PREFIX) and not os.path.exists(image):
                self.skips.add("missing image", image)
            else:
                self.records.append(Record(image, text.strip(), question.strip() if question else None, offset, size))


def _str_field(obj: dict, keys: tuple[str, ...], where: str) -> str:
    for k in keys:
        if k in obj:
            if not isinstance(obj[k], str):
                raise DataError(f"{where}: key {k!r} must be a string, got {type(obj[k]).__name__}")
            return obj[k]
    raise DataError(f"{where}: missing key {' or '.join(repr(k) for k in keys)}")


def _pairs(obj: dict, task: str, where: str) -> list[tuple[str | None, str]]:
    """(question, text) pairs of one JSON object: caption/text, or question+answer / questions,
    or ("vqa+caption") the caption, if it has one, and then every question it has."""
    if task == "caption":
        return [(None, _str_field(obj, ("caption", "text"), where))]
    if task == "vqa+caption":
        caption = [(None, _str_field(obj, ("caption", "text"), where))] if {"caption", "text"} & obj.keys() else []
        asked = "question" in obj or "questions" in obj
        return caption + (_pairs(obj, "vqa", where) if asked or not caption else [])
    if "questions" in obj and "question" not in obj:
        qs = obj["questions"]
        if not isinstance(qs, list) or not all(isinstance(q, dict) for q in qs):
            raise DataError(f"{where}: key 'questions' must be a list of {{'question', 'answer'}} objects")
        return [(_str_field(q, ("question",), f"{where} questions[{i}]"),
                 _str_field(q, ("answer",), f"{where} questions[{i}]")) for i, q in enumerate(qs)]
    return [(_str_field(obj, ("question",), where), _str_field(obj, ("answer",), where))]


def _json_object(text: str, where: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_jsonl(path, task, root, check_files) -> tuple[list[Record], SkipLog]:
    b = _Builder(root or os.path.dirname(os.path.abspath(path)), task, check_files)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            obj = _json_object(line, where)
            pairs = _pairs(obj, task, where)
            if not pairs:  # e.g. a world record written with_questions=False
                b.skips.add("no questions", where)
            b.add(where, _str_field(obj, ("image",), where), pairs)
    return b.records, b.skips


def _read_csv(path, task, root, check_files) -> tuple[list[Record], SkipLog]:
    b = _Builder(root or os.path.dirname(os.path.abspath(path)), task, check_files)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            text_col = "text" if "caption" not in header and "text" in header else "caption"
            need = ("image", text_col) if task == "caption" else ("image", "question", "answer")  # vqa(+caption)
            if any(c not in header for c in need):
                raise DataError(f"{path}: header {header} lacks column(s) {[c for c in need if c not in header]}")
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if None in row or any(row[c] is None for c in need):
                    raise DataError(f"{where}: the number of fields differs from the header's {len(header)}")
                b.add(where, row["image"], [(row.get("question"), row[need[-1]])] if task != "caption"
                      else [(None, row[text_col])])
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    return b.records, b.skips


def _read_folder(path, task, root, check_files) -> tuple[list[Record], SkipLog]:
    for name, reader in (("captions.jsonl", _read_jsonl), ("captions.csv", _read_csv)):
        index = os.path.join(path, name)
        if os.path.isfile(index):
            return reader(index, task, root, check_files)
    if task != "caption":
        raise DataError(f"{path}: a folder with .txt captions has no questions; "
                        f"give it a captions.jsonl or captions.csv with question/answer")
    b = _Builder(path, task, check_files=False)
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()  # walk order decides record order: keep it the same on every machine
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in FOLDER_IMAGE_EXTS:
                continue
            image = os.path.join(dirpath, name)
            txt = os.path.join(dirpath, stem + ".txt")
            if not os.path.isfile(txt):
                b.skips.add("missing caption", image)
                continue
            try:
                with open(txt, encoding="utf-8") as f:
                    caption = f.read()
            except UnicodeDecodeError as err:
                raise DataError(f"{txt}: caption file is not UTF-8 text ({err.reason})") from None
            b.add(txt, image, [(None, caption)])
    return b.records, b.skips


def _read_tar(path, task) -> tuple[list[Record], SkipLog]:
    shard = os.path.abspath(path)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    texts: dict[tuple[str, str], str] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:  # "r:" only: a compressed shard has no offsets
            for m in tar:
                if not m.isfile():
                    continue
                d, base = posixpath.split(m.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key, ext = posixpath.join(d, stem), ext.lower()
                members = groups.setdefault(key, {})
                if ext in TAR_IMAGE_EXTS:
                    members.setdefault("image", m)
                elif ext in ("txt", "json"):
                    members[ext] = m
                    texts[(key, ext)] = tar.extractfile(m).read().decode("utf-8")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{shard}: cannot index the tar shard ({err}); shards must be uncompressed .tar") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{shard}: a .txt/.json member is not UTF-8 ({err})") from None
    b = _Builder(os.path.dirname(shard), task, check_files=False)
    for key, members in groups.items():
        where = f"{shard}#{key}"
        if "image" not in members or not ({"txt", "json"} & members.keys()):
            if members.keys() & {"image", "txt", "json"}:  # a half sample, not just a .cls
                b.skips.add("missing caption" if "image" in members else "missing image", where)
            continue
        if task != "vqa" and "txt" in members and (task == "caption" or "json" not in members):
            pairs = [(None, texts[(key, "txt")])]
        elif "json" in members:
            name = f"{shard}#{members['json'].name}"
            pairs = _pairs(_json_object(texts[(key, "json")], name), task, name)
        else:  # vqa, and only a caption: like a JSONL line without questions
            pairs = []
        if not pairs:
            b.skips.add("no questions", where)
        img = members["image"]
        b.add(where, f"{TAR_PREFIX}{shard}#{img.name}", pairs, img.offset_data, img.size)
    return b.records, b.skips


__all__ = ["DataError", "Record", "SkipLog", "read_records", "expand_source", "TAR_PREFIX"]
