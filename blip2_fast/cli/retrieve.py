"""`blip2-fast retrieve --images DIR --texts FILE`: printing over `blip2_fast.retrieval.Retriever`."""
from __future__ import annotations

import argparse
import json
import sys

from ..engine import EngineError, default_device, resolve_model
from ..retrieval import RetrievalError, Retriever, list_images, read_texts


def retrieve_main(args) -> int:
    """`blip2-fast retrieve --images DIR --texts FILE`: argparse Namespace or dict with model,
    images, texts, k, batch_size, device, dtype, top, json (or json_output), cache (optional).
    Prints, per text, its `top` images, then per image its `top` texts; tab-separated
    `t2i<TAB>text<TAB>rank<TAB>image<TAB>score` / `i2t<TAB>image<TAB>rank<TAB>text<TAB>score`, or one
    JSON object per query with --json. User-fixable problems raise `EngineError` (exit status 2)."""
    a = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    as_json = bool(a.get("json_output", a.get("json", False)))
    k, top, batch = a.get("k") or 128, a.get("top") or 5, a.get("batch_size") or 32
    try:
        if k < 1 or top < 1 or batch < 1:
            raise RetrievalError(f"--k, --top and --batch-size must be >= 1 (got {k}, {top}, {batch})")
        paths, texts = list_images(a["images"]), read_texts(a["texts"])  # before loading the model
        device = default_device(a.get("device"))
        dtype = a.get("dtype") or ("bfloat16" if device.startswith("cuda") else "float32")
        engine = Retriever.from_pretrained(resolve_model(a.get("model"), "retrieval"), dtype=dtype, device=device,
                                           batch_size=batch)
        result = engine.retrieve(engine.encode_images(paths, cache=a.get("cache")), engine.encode_texts(texts), k)
    except RetrievalError as err:
        raise EngineError(str(err)) from None
    out = a.get("out") or sys.stdout
    for kind, queries, items, ranking in (("t2i", texts, paths, result.text_to_image),
                                          ("i2t", paths, texts, result.image_to_text)):
        idx, score = ranking.indices[:, :top].tolist(), ranking.scores[:, :top].tolist()
        for q, query in enumerate(queries):
            if as_json:
                hits = [{"rank": r + 1, "item": items[i], "score": s} for r, (i, s) in enumerate(zip(idx[q], score[q]))]
                print(json.dumps({"direction": kind, "query": query, "results": hits}, ensure_ascii=False), file=out)
            else:
                for r, (i, s) in enumerate(zip(idx[q], score[q])):
                    print(f"{kind}\t{query}\t{r + 1}\t{items[i]}\t{s:.4f}", file=out)
    return 0


def add_retrieve_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("retrieve", parents=[common], help="rank images for texts and texts for images (ITC + ITM rerank)")
    p.add_argument("--images", required=True, metavar="DIR", help="image folder (hidden files, sub-folders skipped)")
    p.add_argument("--texts", required=True, metavar="FILE", help="UTF-8, one text per line, no blank lines")
    p.add_argument("--k", type=int, default=128, help="ITC candidates reranked by ITM per query (clamped to the gallery)")
    p.add_argument("--top", type=int, default=5, help="results printed per query")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache", metavar="FILE.safetensors", help="gallery feature cache, reused for the same model")


__all__ = ["retrieve_main", "add_retrieve_parser"]
