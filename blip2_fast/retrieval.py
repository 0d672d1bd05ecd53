"""Image-text retrieval engine: ITC over every pair, ITM reranking of the top k.

Procedure (LAVIS' `compute_sim_matrix`, with the work shared where it can be):
  1. Gallery: each image through the ViT once, in batches; kept per image are the normalised
     query features (Q, D) for ITC and the vision tokens (S, E_vision) for ITM. Optionally cached
     on disk (`cache=` a .safetensors file; see `GalleryCache`).
  2. Texts: tokenised with right padding ([CLS] must sit at position 0), normalised [CLS]
     features (D).
  3. ITC similarity (N_images, N_texts) = max over queries of the cosines, no temperature.
  4. Candidates: the top k images per text and the top k texts per image by ITC. k is clamped
     to the gallery (to N_images for text->image, to N_texts for image->text): asking for more
     candidates than exist ranks everything.
  5. ITM for the union of both directions' candidate pairs, each pair scored once, in
     image-major order so that each image's cross-attention K/V is computed once
     (`qformer.image_kv`) and shared by all of its pairs through `image_index`.
  6. Score = ITM logit + ITC similarity, where the ITM logit is the positive-class ("match")
     logit of `itm_head` averaged over the query outputs (transformers' `logits_per_image[:, 1]`).
     This is exactly what LAVIS' evaluation adds (`compute_itm` returns
     `itm_head(...)[:, :, 1].mean(1)`, then `score + topk_sim`): the raw logit, not its softmax
     probability and not the logit difference, so our recall numbers are LAVIS' numbers.
     Candidates are sorted by score (ties keep the ITC order); only the k candidates are ranked.

Inputs from files: `list_images(folder)` takes every regular file of the folder in name order,
skipping hidden files (".*") and sub-folders; any other file that is not a readable image is an
error naming it (never a silent skip: a gallery missing an image would corrupt recall).
`scan_images(folder)` and `encode_images(..., skipped=[])` instead leave unreadable images out
and return each with its reason, for a caller that reports them (the command line does).
`read_texts(path)`: one text per line, UTF-8; a blank line is an error naming its line number.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .atomic import write_file
from .fingerprint import config_bytes, weights_fingerprint
from .images import ImageError, ImageSpec, check_images, open_images, preprocess
from .loading import ITM_HEAD, LLM_PREFIX, checkpoint_keys
from .models.retrieval_heads import Blip2ForImageTextRetrieval
from .tokenizers import load_tokenizer

FORMAT = "blip2_fast.gallery/1"


class RetrievalError(ValueError):
    """Unusable retrieval input (folder, text file, cache, ground truth); the message names it."""


# ---------------------------------------------------------------------------- inputs
def list_images(folder: str) -> list[str]:
    """Image paths of `folder`, sorted by name (hidden files and sub-folders skipped); each is
    header-checked now, so a non-image file fails before any model work (`ImageError`)."""
    return scan_images(folder, strict=True)[0]


def scan_images(folder: str, strict: bool = False) -> tuple[list[str], list[ImageError]]:
    """(readable image paths of `folder` sorted by name, an `ImageError` per unreadable file);
    strict: raise the first error instead. `RetrievalError` when no image is left."""
    if not os.path.isdir(folder):
        why = "is a file, not a folder" if os.path.exists(folder) else "no such folder"
        raise RetrievalError(f"--images {folder}: {why}")
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
             if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    if not paths:
        raise RetrievalError(f"--images {folder}: the folder holds no image files")
    good, bad = check_images(paths, strict)
    if not good:
        raise RetrievalError(f"--images {folder}: none of its {len(paths)} files is a readable image")
    return good, bad


def read_texts(path: str) -> list[str]:
    """One text per line (UTF-8, the final newline optional); blank lines are errors."""
    if not os.path.isfile(path):
        raise RetrievalError(f"--texts {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise RetrievalError(f"--texts {path}: not UTF-8 text ({err})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise RetrievalError(f"{path} line {i} is empty: one text per line, no blank lines")
    if not lines:
        raise RetrievalError(f"--texts {path}: the file holds no texts")
    return [line.strip() for line in lines]


# ---------------------------------------------------------------------------- results
@dataclass
class Gallery:
    names: list[str]
    features: torch.Tensor  # (N, Q, D) normalised query features
    vision_tokens: torch.Tensor  # (N, S, E_vision), for ITM


@dataclass
class TextSet:
    texts: list[str]
    features: torch.Tensor  # (N, D) normalised
    input_ids: torch.Tensor  # (N, T), right padded
    attention_mask: torch.Tensor  # (N, T)


@dataclass
class Ranking:
    indices: torch.Tensor  # (N_queries, k) best first
    scores: torch.Tensor  # (N_queries, k) ITM logit + ITC
    itc: torch.Tensor  # (N_queries, k)


@dataclass
class RetrievalResult:
    similarity: torch.Tensor  # (N_images, N_texts) ITC
    text_to_image: Ranking  # indices into the gallery
    image_to_text: Ranking  # indices into the texts


# ---------------------------------------------------------------------------- model identity
def model_fingerprint(model, spec=None) -> str:
    """The weights fingerprint of a retrieval model together with its config and image preprocessing."""
    return weights_fingerprint([config_bytes(model.config.to_hf_dict()), repr(spec).encode()], model.state_dict())


class GalleryCache:
    """A safetensors file: `features` (N, Q, D), `vision_tokens` (N, S, E) and metadata naming the
    format, the model fingerprint, and each image's absolute path with its (size, mtime) stamp.
    The vision tokens make it large (ViT-g at 224 px: 257 x 1408 values, ~0.7 MB per image in
    bf16) but let ITM rerank without running the ViT again. Entries
    whose path and stamp match are reused, the others encoded, and the file rewritten
    atomically. A file from another model (or another preprocessing) raises `RetrievalError`."""

    def __init__(self, path: str, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint

    @staticmethod
    def stamp(path: str) -> list[int]:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]

    def load(self, feature_shape: tuple[int, int] | None = None,
             token_dim: int | None = None) -> dict[str, tuple[list[int], torch.Tensor, torch.Tensor]]:
        """path -> (stamp, query features, vision tokens); `feature_shape` (queries, dim) and
        `token_dim` are what the model makes, which every cached row must have."""
        if not os.path.exists(self.path):
            return {}
        from safetensors import safe_open
        try:
            with safe_open(self.path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise RetrievalError(f"cache {self.path}: not a blip2_fast gallery cache (format "
                                         f"{meta.get('format')!r}, expected {FORMAT!r})")
                if meta.get("fingerprint") != self.fingerprint:
                    raise RetrievalError(f"cache {self.path} was written by a different model or image preprocessing "
                                         f"(fingerprint {meta.get('fingerprint', '?')[:12]}..., this model "
                                         f"{self.fingerprint[:12]}...): delete it or choose another cache file")
                feats, tokens = f.get_tensor("features"), f.get_tensor("vision_tokens")
        except RetrievalError:
            raise
        except Exception as err:
            raise RetrievalError(f"cache {self.path}: unreadable ({err}); delete it to rebuild") from None
        names, stamps = self._entries(meta, feats, tokens)
        if (feature_shape is not None and tuple(feats.shape[1:]) != tuple(feature_shape)) or \
                (token_dim is not None and tokens.shape[-1] != token_dim):
            raise RetrievalError(f"cache {self.path}: features {tuple(feats.shape[1:])} and vision tokens of width "
                                 f"{tokens.shape[-1]} per image, this model makes {tuple(feature_shape or ())} and "
                                 f"{token_dim}; delete it to rebuild")
        return {n: (s, feats[i], tokens[i]) for i, (n, s) in enumerate(zip(names, stamps))}

    def _entries(self, meta: dict, feats: torch.Tensor, tokens: torch.Tensor) -> tuple[list[str], list[list[int]]]:
        """The cached names and stamps, after checking that the file is what `save` writes: a
        name and stamp per row, (N, Q, D) and (N, S, E) float tensors, every value finite."""
        def bad(why: str) -> RetrievalError:
            return RetrievalError(f"cache {self.path}: {why}; delete it to rebuild")
        try:
            names, stamps = json.loads(meta["names"]), json.loads(meta["stamps"])  # absolute paths
        except (KeyError, TypeError, ValueError) as err:
            raise bad(f"unreadable image list ({type(err).__name__}: {err})") from None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                and isinstance(stamps, list) and all(isinstance(s, list) and len(s) == 2
                                                     and all(isinstance(v, int) for v in s) for s in stamps)):
            raise bad("its image list is not a list of paths with [size, mtime] stamps")
        if feats.dim() != 3 or tokens.dim() != 3 or not feats.is_floating_point() or not tokens.is_floating_point():
            raise bad(f"features {tuple(feats.shape)} {feats.dtype} and vision tokens {tuple(tokens.shape)} "
                      f"{tokens.dtype}: expected (N, queries, dim) and (N, tokens, dim) floats")
        if not len(names) == len(stamps) == feats.shape[0] == tokens.shape[0]:
            raise bad(f"{len(names)} names, {len(stamps)} stamps, {feats.shape[0]} feature rows and "
                      f"{tokens.shape[0]} vision-token rows: they must be equal")
        if not (torch.isfinite(feats).all() and torch.isfinite(tokens).all()):
            raise bad("it holds NaN or infinite values")
        return names, stamps

    def save(self, gallery: Gallery) -> None:
        from safetensors.torch import save_file
        names = [os.path.abspath(n) for n in gallery.names]
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "names": json.dumps(names),
                "stamps": json.dumps([self.stamp(n) for n in gallery.names])}
        tensors = {"features": gallery.features.contiguous().cpu(),
                   "vision_tokens": gallery.vision_tokens.contiguous().cpu()}
        write_file(self.path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# ---------------------------------------------------------------------------- engine
class Retriever:
    """A loaded `Blip2ForImageTextRetrieval` with its tokenizer and image settings.

    batch_size: images per ViT batch and per ITM image chunk; itm_batch_size: pairs per ITM call.
    """

    def __init__(self, model, tokenizer=None, spec=None, batch_size: int = 32, itm_batch_size: int = 128,
                 progress: bool = True):
        if batch_size < 1 or itm_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {itm_batch_size}")
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.batch_size, self.itm_batch_size, self.progress = batch_size, itm_batch_size, progress
        if tokenizer is not None:
            tokenizer.padding_side = "right"  # [CLS] at position 0 for ITC

    @classmethod
    def from_pretrained(cls, folder: str, dtype=None, device=None, **kw) -> "Retriever":
        keys = checkpoint_keys(folder)
        if ITM_HEAD not in keys and any(k.startswith(LLM_PREFIX) for k in keys):
            raise RetrievalError(f"--model {folder}: a captioning/VQA model folder (an LLM, no ITM head); retrieve "
                                 f"needs an image-text retrieval folder (Blip2ForImageTextRetrieval, e.g. a stage-1 "
                                 f"export); use this one with `blip2-fast caption` or `vqa`")
        model = Blip2ForImageTextRetrieval.from_pretrained(folder, dtype=dtype, device=device)
        return cls(model, load_tokenizer(folder), ImageSpec.from_folder(folder, model.config.vision.image_size), **kw)

    def _bar(self, total: int, unit: str):
        from tqdm import tqdm
        return tqdm(total=total, unit=unit, file=sys.stderr, disable=not self.progress)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_images(self, images, cache: str | None = None, skipped: list | None = None) -> Gallery:
        """`images`: image paths, or pixel_values (N, 3, H, W). `cache`: a .safetensors file
        (paths only) reused for images already encoded by this same model. `skipped`: a list
        that receives an `ImageError` per image that cannot be decoded, which the gallery then
        leaves out (without it, the first such image raises)."""
        if isinstance(images, torch.Tensor):
            if cache is not None:
                raise ValueError("cache= needs image paths (entries are keyed by file), not pixel tensors")
            feats, tokens = self._encode_pixels(images)
            return Gallery([str(i) for i in range(images.shape[0])], feats, tokens)
        paths = list(images)
        if not paths:
            raise RetrievalError("no images to encode")
        store = GalleryCache(cache, model_fingerprint(self.model, self.spec)) if cache else None
        config = self.model.config
        known = store.load((config.num_query_tokens, config.image_text_hidden_size),
                           config.vision.hidden_size) if store else {}
        key = {p: os.path.abspath(p) for p in paths}
        todo = [p for p in paths if key[p] not in known or known[key[p]][0] != GalleryCache.stamp(p)]
        if not todo:
            fresh = {}
        else:  # a plain call when nothing may be skipped (what callers and tests that wrap it know)
            fresh = self._encode_files(todo) if skipped is None else self._encode_files(todo, skipped)
        tried = set(todo)
        paths = [p for p in paths if p in fresh or p not in tried]
        if not paths:
            raise RetrievalError("none of the images could be decoded")
        dev = self.model.device
        feats = torch.stack([(fresh[p][0] if p in fresh else known[key[p]][1]).to(dev) for p in paths])
        tokens = torch.stack([(fresh[p][1] if p in fresh else known[key[p]][2]).to(dev) for p in paths])
        gallery = Gallery(paths, feats, tokens)
        if store and todo:
            store.save(gallery)
        return gallery

    def _encode_files(self, paths: list[str], skipped: list | None = None) -> dict:
        """path -> (query features, vision tokens) for each path decoded; with `skipped`, the
        others' errors are appended there, else the first one raises."""
        if self.spec is None:
            raise ValueError("encoding image files needs an ImageSpec (spec=); or pass pixel_values")
        chunks = [paths[i:i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        out, bar = {}, self._bar(len(paths), "img")

        def decode(chunk):
            return open_images(chunk, strict=skipped is None)

        try:
            with ThreadPoolExecutor(1) as pool:  # decode the next batch while the model runs
                nxt = pool.submit(decode, chunks[0])
                for i in range(len(chunks)):
                    names, images, errors = nxt.result()
                    if i + 1 < len(chunks):
                        nxt = pool.submit(decode, chunks[i + 1])
                    if skipped is not None:
                        skipped.extend(errors)
                    if images:
                        t, f = self.model.encode_image(preprocess(images, self.spec))
                        out.update(zip(names, zip(f.unbind(0), t.unbind(0))))
                    bar.update(len(chunks[i]))
        finally:
            bar.close()  # ends the bar's line, so that an error message starts a line of its own
        return out

    def _encode_pixels(self, pixels: torch.Tensor):
        feats, tokens = [], []
        for i in range(0, pixels.shape[0], self.batch_size):
            t, f = self.model.encode_image(pixels[i:i + self.batch_size])
            feats.append(f)
            tokens.append(t)
        return torch.cat(feats), torch.cat(tokens)

    @torch.no_grad()
    def encode_texts(self, texts) -> TextSet:
        """`texts`: strings (tokenised here), or (input_ids, attention_mask) of plain text."""
        if isinstance(texts, tuple):
            ids, mask = texts
            names = [str(i) for i in range(ids.shape[0])]
        else:
            names = list(texts)
            if not names:
                raise RetrievalError("no texts to encode")
            if self.tokenizer is None:
                raise ValueError("encoding strings needs a tokenizer (tokenizer=); or pass (input_ids, attention_mask)")
            enc = self.tokenizer(names, padding=True, truncation=True, return_tensors="pt",
                                 max_length=self.model.config.qformer.max_position_embeddings,
                                 return_token_type_ids=False)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        feats = torch.cat([self.model.encode_text(ids[i:i + self.itm_batch_size], mask[i:i + self.itm_batch_size])
                           for i in range(0, ids.shape[0], self.itm_batch_size)])
        return TextSet(names, feats, ids, mask)

    # ------------------------------------------------------------------ scoring
    def similarity(self, gallery: Gallery, texts: TextSet) -> torch.Tensor:
        """ITC (N_images, N_texts) in fp32, in image chunks (the (c, Q, N_texts) product stays small)."""
        t = texts.features.float().t()  # (D, Nt)
        return torch.cat([(f.float() @ t).amax(dim=1) for f in gallery.features.split(self.batch_size)])

    @torch.no_grad()
    def itm_scores(self, gallery: Gallery, texts: TextSet, pairs: torch.Tensor) -> torch.Tensor:
        """Positive-class ITM logits (P,) for pairs (P, 2) = (image, text), sorted by image."""
        pairs = pairs.cpu()
        img, txt = pairs[:, 0], pairs[:, 1]
        if img.numel() > 1 and bool((img[1:] < img[:-1]).any()):
            raise ValueError("pairs must be sorted by image index")
        starts = torch.cat([torch.zeros(1, dtype=torch.long),
                            torch.bincount(img, minlength=len(gallery.names)).cumsum(0)]).tolist()
        length = (texts.attention_mask.ne(0).cumsum(1).argmax(1) + 1).cpu()  # (Nt,) last real token + 1
        out, bar, dev = torch.empty(pairs.shape[0]), self._bar(pairs.shape[0], "pair"), self.model.device
        for a in range(0, len(gallery.names), self.batch_size):
            b = min(a + self.batch_size, len(gallery.names))
            lo, hi = starts[a], starts[b]
            if lo == hi:
                continue
            kv = self.model.qformer.image_kv(gallery.vision_tokens[a:b])  # once per image
            for s in range(lo, hi, self.itm_batch_size):
                e = min(s + self.itm_batch_size, hi)
                rows = txt[s:e]
                width = int(length[rows].max())  # trailing all-padding columns change nothing
                ids, mask = texts.input_ids[rows.to(dev), :width], texts.attention_mask[rows.to(dev), :width]
                logits = self.model.itm_logits(kv, (img[s:e] - a).to(dev), ids, mask)
                out[s:e] = logits[:, 1].float().cpu()
                bar.update(e - s)
        bar.close()
        return out

    @torch.no_grad()
    def retrieve(self, gallery: Gallery, texts: TextSet, k: int = 128) -> RetrievalResult:
        """Both directions, k candidates each (clamped to what exists), reranked by ITM + ITC."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        sim = self.similarity(gallery, texts)  # (Ni, Nt)
        Ni, Nt = sim.shape
        t2i_itc, t2i_idx = sim.t().topk(min(k, Ni), dim=1)  # (Nt, k_i)
        i2t_itc, i2t_idx = sim.topk(min(k, Nt), dim=1)  # (Ni, k_t)
        t_rows = torch.arange(Nt, device=sim.device)[:, None]
        i_rows = torch.arange(Ni, device=sim.device)[:, None]
        t2i_keys, i2t_keys = t2i_idx * Nt + t_rows, i_rows * Nt + i2t_idx  # pair key = image * Nt + text
        keys = torch.unique(torch.cat([t2i_keys.reshape(-1), i2t_keys.reshape(-1)]))  # sorted: image-major
        itm = self.itm_scores(gallery, texts, torch.stack([keys // Nt, keys % Nt], 1)).to(sim.device)

        def rank(cand_keys, cand_idx, cand_itc) -> Ranking:
            score = itm[torch.searchsorted(keys, cand_keys)] + cand_itc
            score, order = score.sort(dim=1, descending=True, stable=True)
            return Ranking(cand_idx.gather(1, order), score, cand_itc.gather(1, order))

        return RetrievalResult(sim, rank(t2i_keys, t2i_idx, t2i_itc), rank(i2t_keys, i2t_idx, i2t_itc))


# ---------------------------------------------------------------------------- metrics
def recall_at_k(rankings, truth, ks=(1, 5, 10)) -> dict[int, float]:
    """Fraction of queries with a correct item among their first K ranked items, for each K.

    rankings: (N_queries, W) item indices, best first. truth: per query an int or a collection of
    ints (several correct items, e.g. the 5 captions of a COCO image). A K above W counts the W
    listed items (right when the ranking covers the gallery, as after k-clamping)."""
    rankings = torch.as_tensor(rankings).cpu()
    if rankings.dim() != 2:
        raise RetrievalError(f"rankings must be (queries, ranked items), got shape {tuple(rankings.shape)}")
    if len(truth) != rankings.shape[0]:
        raise RetrievalError(f"{rankings.shape[0]} ranked queries but ground truth for {len(truth)}")
    hits = torch.zeros(rankings.shape, dtype=torch.bool)
    for q, good in enumerate(truth):
        good = [int(g) for g in good] if hasattr(good, "__iter__") and getattr(good, "ndim", 1) else [int(good)]
        if not good:
            raise RetrievalError(f"query {q} has no correct item in the ground truth")
        hits[q] = torch.isin(rankings[q], torch.tensor(good))
    first = torch.where(hits.any(1), hits.float().argmax(1), rankings.shape[1])  # rank of the first hit
    return {k: float((first < k).float().mean()) for k in ks}


__all__ = ["Retriever", "Gallery", "TextSet", "Ranking", "RetrievalResult", "RetrievalError", "GalleryCache",
           "list_images", "scan_images", "read_texts", "recall_at_k", "model_fingerprint"]
