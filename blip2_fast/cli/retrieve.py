"""`blip2-fast retrieve --images DIR --texts FILE`: printing over `blip2_fast.retrieval.Retriever`.

Text output starts with one comment line ("# direction<TAB>query<TAB>rank<TAB>result<TAB>score")
naming the tab-separated columns of the rows after it; `--json` prints JSON lines only. An
unreadable image is skipped with its reason on stderr and counted in a closing line on stderr
(`--strict`: the first one stops the command).
"""
from __future__ import annotations

import json
import sys

from ..engine import EngineError, default_device, resolve_model
from ..retrieval import RetrievalError, Retriever, read_texts, scan_images
from .generate import report_skipped

HEADER = "# direction\tquery\trank\tresult\tscore"


def retrieve_main(args) -> int:
    """`blip2-fast retrieve --images DIR --texts FILE`: argparse Namespace or dict with model,
    images, texts, k, batch_size, device, dtype, top, json (or json_output), cache, strict (optional).
    Prints, per text, its `top` images, then per image its `top` texts; tab-separated
    `t2i<TAB>text<TAB>rank<TAB>image<TAB>score` / `i2t<TAB>image<TAB>rank<TAB>text<TAB>score` after a
    '#' header line, or one JSON object per query with --json. User-fixable problems raise
    `EngineError` (exit status 2)."""
    a = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    as_json = bool(a.get("json_output", a.get("json", False)))
    k, top, batch = a.get("k") or 128, a.get("top") or 5, a.get("batch_size") or 32
    strict = bool(a.get("strict", False))
    try:
        if k < 1 or top < 1 or batch < 1:
            raise RetrievalError(f"--k, --top and --batch-size must be >= 1 (got {k}, {top}, {batch})")
        paths, skipped = scan_images(a["images"], strict=strict)  # before loading the model
        report_skipped(skipped)
        texts = read_texts(a["texts"])
        device = default_device(a.get("device"))
        dtype = a.get("dtype") or ("bfloat16" if device.startswith("cuda") else "float32")
        engine = Retriever.from_pretrained(resolve_model(a.get("model"), "retrieval"), dtype=dtype, device=device,
                                           batch_size=batch)
        undecodable = None if strict else []
        gallery = engine.encode_images(paths, cache=a.get("cache"), skipped=undecodable)
        report_skipped(undecodable or [])
        skipped += undecodable or []
        result = engine.retrieve(gallery, engine.encode_texts(texts), k)
    except RetrievalError as err:
        raise EngineError(str(err)) from None
    out = a.get("out") or sys.stdout
    if not as_json:
        print(HEADER, file=out)
    paths = gallery.names
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
    if skipped:
        print(f"blip2-fast: {len(paths)} images ranked, {len(skipped)} skipped (reasons above; --strict stops at "
              f"the first)", file=sys.stderr)
    return 0


def add_retrieve_parser(sub) -> None:
    p = sub.add_parser("retrieve", help="rank images for texts and texts for images (ITC + ITM rerank)",
                       description="Rank the images of a folder for each text, and the texts for each image.")
    p.add_argument("--images", required=True, metavar="DIR", help="image folder (hidden files, sub-folders skipped)")
    p.add_argument("--texts", required=True, metavar="FILE", help="UTF-8, one text per line, no blank lines")
    p.add_argument("--model", help="retrieval model folder (Blip2ForImageTextRetrieval) or hub id (default: the "
                                   "shipped blip2-shapes-itm)")
    p.add_argument("--k", type=int, default=128,
                   help="ITC candidates reranked by ITM per query (clamped to the gallery)")
    p.add_argument("--top", type=int, default=5, help="results printed per query")
    p.add_argument("--batch-size", type=int, default=32, help="images encoded together, and per ITM image chunk")
    p.add_argument("--cache", metavar="FILE.safetensors", help="gallery feature cache, reused for the same model "
                                                               "and unchanged images (default: none)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto"],
                   help="weights' dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads torch may use (default: torch's choice, usually one "
                                               "per core)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--json", dest="json_output", action="store_true", help="one JSON object per query, no header")


__all__ = ["retrieve_main", "add_retrieve_parser", "HEADER"]
