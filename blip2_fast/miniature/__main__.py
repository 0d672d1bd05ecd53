"""`python -m blip2_fast.miniature pretrain --out DIR [--quick] [--seed S]`

Recipe step 1 from scratch: the two tokenizers, the three unimodal pretrainings and the
assembled initial BLIP-2 folder, with a progress bar and a closing table of what each part
reached and how long it took. Layout under DIR:
  tokenizer/          OPT byte-level BPE (blip2_fast.bpe)
  qformer_tokenizer/  the Q-Former's WordPiece
  vision/ lm/ text_encoder/   weights + metrics.json of each pretraining
  initial/            the transformers-format BLIP-2 folder stage 1 starts from
  summary.json        the table's numbers
--quick runs a few steps of each part (for tests); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

from .pretrain import pretrain

def format_table(summary: dict) -> str:
    """One row per part: what it reached on its validation set and its wall time."""
    rows = [("part", "result (fresh-seed validation)", "seconds")]
    s = summary
    if "tokenizers" in s:
        t = s["tokenizers"]
        rows.append(("tokenizers", f"OPT BPE {t['opt_vocab_size']} tokens, Q-Former WordPiece "
                                   f"{t['qformer_vocab_size']}", t["seconds"]))
    if "vision" in s:
        v = s["vision"]["val"]
        rows.append(("vision ViT", "attribute accuracy " + ", ".join(
            f"{r} {v[r]['attribute_accuracy']:.4f} (all right {v[r]['image_all_correct']:.3f})" for r in v),
            s["vision"]["seconds"]))
    if "lm" in s:
        m = s["lm"]
        rows.append(("OPT LM", f"loss {m['val_loss']:.4f}, perplexity {m['val_perplexity']:.3f}, "
                               f"next-token accuracy {m['val_token_accuracy']:.4f}", m["seconds"]))
    if "text" in s:
        m = s["text"]
        rows.append(("text encoder", f"masked accuracy {m['val_masked_accuracy']:.4f} (structure words "
                                     f"{m['val_masked_accuracy_structure']:.4f}, attribute words "
                                     f"{m['val_masked_accuracy_content']:.4f})", m["seconds"]))
    if "assemble" in s:
        rows.append(("assemble", f"{s['assemble']['folder']} ({s['assemble']['megabytes']:.1f} MB)",
                     s["assemble"]["seconds"]))
    total = sum(p["seconds"] for p in s.values())
    rows.append(("total", "", total))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    fmt = lambda r: f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2] if isinstance(r[2], str) else f'{r[2]:8.1f}'}"
    return "\n".join(fmt(r) for r in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m blip2_fast.miniature",
                                description="Train the miniature BLIP-2 of the world of shapes.")
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="tokenizers, ViT, OPT LM, text encoder, initial BLIP-2 folder")
    rep = sub.add_parser("reproduce", help="the whole recipe: pretraining, stage 1, stage 2, finetune, evaluation")
    for q in (pre, rep):
        q.add_argument("--out", required=True, help="output folder (created)")
        q.add_argument("--quick", action="store_true", help="a few steps of each part (tests)")
        q.add_argument("--seed", type=int, default=0)
    rep.add_argument("--ablation", action="store_true", help="also stage 2 + finetune without stage 1")
    rep.add_argument("--pretrained", help="reuse this finished `pretrain` folder instead of pretraining again")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    progress = sys.stderr.isatty() or not args.quick
    if args.command == "pretrain":
        summary = pretrain(args.out, quick=args.quick, seed=args.seed, progress=progress)
        print(format_table(summary))
        return summary
    from .recipe import reproduce
    result = reproduce(args.out, quick=args.quick, seed=args.seed, ablation=args.ablation, progress=progress,
                       pretrained=args.pretrained)
    print(format_results(result))
    return result


def format_results(result: dict) -> str:
    """The evaluation of `reproduce` (and of its ablation) as a table, with the stages' times."""
    keys = [("caption_accuracy", "captioning, all attributes right"), ("vqa_accuracy", "VQA exact answers"),
            ("text_to_image_r1", "text -> image recall@1"), ("image_to_text_r1", "image -> text recall@1")]
    runs = [("recipe", result["report"])] + ([("without stage 1", result["ablation"])] if "ablation" in result else [])
    lines = [f"{'metric':<34}" + "".join(f"{name:>18}" for name, _ in runs)]
    for key, label in keys:
        lines.append(f"{label:<34}" + "".join(f"{r[key]:>18.3f}" if key in r else f"{'-':>18}" for _, r in runs))
    types = sorted({t for _, r in runs for t in r.get("vqa_accuracy_by_type", {})})
    for t in types:  # VQA per question type (colour and shape words as C and S)
        row = [r.get("vqa_accuracy_by_type", {}).get(t) for _, r in runs]
        lines.append(f"{'  ' + t:<34}" + "".join(f"{v:>18.3f}" if v is not None else f"{'-':>18}" for v in row))
    paired = result.get("ablation_paired")
    if paired:
        lines += ["", f"paired on {paired['images']} other fresh scenes (seed {paired['seed']}): recipe, without stage 1, "
                      f"items only each got right, McNemar z"]
        for key, label in (("caption", "captioning, all attributes right"), ("vqa", "VQA exact answers")):
            p = paired[key]
            lines.append(f"{label:<34}{p['accuracy_a']:>18.3f}{p['accuracy_b']:>18.3f}{p['only_a']:>8d}{p['only_b']:>8d}"
                         f"{p['mcnemar_z']:>8.2f}")
    early = result.get("ablation_early")
    if early:
        lines += ["", f"stage 2 on captions alone for a few steps, captions right on {early['images']} fresh scenes:"]
        for budget, row in early["steps"].items():
            lines.append(f"{'  after ' + budget + ' steps':<34}" + "".join(f"{row[name]:>18.3f}" for name, _ in runs))
    lines.append("")
    lines += [f"{stage:<34}{seconds:>10.0f} s" for stage, seconds in result["times"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
