"""`blip2-fast` (also `python -m blip2_fast`): argument parsing and printing only.

    blip2-fast caption IMG... [--model FOLDER_OR_HUB_ID] [--prompt "a photo of"] [--json]
    blip2-fast vqa IMG --question "what is this?" [--model ...]
    blip2-fast chat IMG [--model ...]        (questions from stdin; EOF or 'exit' ends)
    blip2-fast retrieve --images DIR --texts FILE [--model ...]
    blip2-fast train --stage 1|2|caption|vqa --model FOLDER --data FILE ...
    blip2-fast demo [--n 8]

Each subcommand's module parses its flags and prints; the work is done by the engine
(`blip2_fast.engine`), the retrieval library (`blip2_fast.retrieval`), the training core
(`blip2_fast.training`) and the miniature (`blip2_fast.miniature`). Problems users can fix
(missing or unreadable files, no model, no tokenizer, bad settings) exit with status 2 and one
line on stderr, without a traceback.
"""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..engine import EngineError
from ..images import ImageError
from ..loading import CheckpointError
from ..tokenizers import TokenizerError
from ..training.data import DataError
from .demo import add_demo_parser, demo_main
from .generate import add_generation_parsers, caption, chat, generation_flags, vqa
from .retrieve import add_retrieve_parser, retrieve_main
from .train import add_train_parser, train_main

CLIError = EngineError  # the name callers of the command line know: a problem the user can fix
USER_ERRORS = (EngineError, TokenizerError, ImageError, CheckpointError, ConfigError, DataError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-fast", description="BLIP-2 captioning, VQA and chat.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = generation_flags()
    add_generation_parsers(sub, common)
    add_retrieve_parser(sub, common)
    add_train_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = {"caption": caption, "vqa": vqa, "chat": chat, "retrieve": lambda **kw: retrieve_main(kw),
               "train": lambda **kw: train_main(kw), "demo": lambda **kw: demo_main(kw)}[args.pop("command")]
    try:
        return command(**args)
    except USER_ERRORS as err:
        print(f"blip2-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


__all__ = ["main", "build_parser", "caption", "vqa", "chat", "CLIError"]
