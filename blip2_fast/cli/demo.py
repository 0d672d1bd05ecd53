"""`blip2-fast demo`: the shipped miniature BLIP-2 on freshly rendered scenes (`blip2_fast.miniature.demo`)."""
from __future__ import annotations

from ..miniature.demo import demo


def demo_main(args: dict) -> int:
    demo(n=args["n"], seed=args["seed"], model=args.get("model"), retrieval_model=args.get("retrieval_model"),
         device=args.get("device"), save=args.get("save"))
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="caption, question and retrieve freshly rendered shape scenes with the "
                                    "shipped models")
    p.add_argument("--n", type=int, default=8, help="scenes to render (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rendered scenes")
    p.add_argument("--model", help="captioning/VQA model folder (default: the shipped blip2-shapes)")
    p.add_argument("--retrieval-model", help="retrieval model folder (default: the shipped blip2-shapes-itm)")
    p.add_argument("--device", help="cpu, cuda ... (default cuda when available)")
    p.add_argument("--save", metavar="DIR", help="also write the rendered images as PNG files into DIR "
                                                 "(default: not written)")


__all__ = ["demo_main", "add_demo_parser"]
