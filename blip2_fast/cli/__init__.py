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
(missing or unreadable files, no model, no tokenizer, bad settings, a full disk) exit with
status 2 and one line on stderr, without a traceback; an unknown flag prints the subcommand's
usage. Under torchrun only rank 0 prints (RANK, else LOCAL_RANK, from the environment).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from ..atomic import DiskFullError
from ..config import ConfigError
from ..engine import EngineError, set_threads
from ..images import ImageError
from ..loading import CheckpointError
from ..retrieval import RetrievalError
from ..tokenizers import TokenizerError
from ..training.data import DataError
from .demo import add_demo_parser, demo_main
from .generate import add_generation_parsers, caption, chat, generation_flags, vqa
from .retrieve import add_retrieve_parser, retrieve_main
from .train import add_train_parser, train_main

CLIError = EngineError  # the name callers of the command line know: a problem the user can fix
USER_ERRORS = (EngineError, TokenizerError, ImageError, CheckpointError, ConfigError, DataError, RetrievalError,
               DiskFullError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default ("off" for a switch), unless the help already
    says it; a flag whose default is None must say in its help what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if action.default is False and action.nargs == 0:
            return f"{text} (default: off)"
        return super()._get_help_string(action)


class CpuRefusalsAtDebug(logging.Filter):
    """The kernel registry logs at INFO each backend refused for a reason beside its device; on
    the CPU every GPU-only backend is refused, which is no news: such lines go to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and "refused" in str(record.msg) and \
                any("tensor on cpu" in str(arg) for arg in (record.args or ())):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def process_rank() -> int:
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def configure_logging(command: str, rank: int) -> int:
    """Log settings for a command; returns the package logger's level before, for `main` to
    restore (main may be called in-process, by tests or scripts)."""
    kernels = logging.getLogger("blip2_fast.kernels")
    if not any(isinstance(f, CpuRefusalsAtDebug) for f in kernels.filters):
        kernels.addFilter(CpuRefusalsAtDebug())
    if command == "train":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    package = logging.getLogger("blip2_fast")
    before = package.level
    if rank != 0:  # every rank logs the same; rank 0 speaks for all, other ranks only for errors
        package.setLevel(logging.ERROR)
    return before


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-fast", description="BLIP-2 captioning, VQA and chat.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = generation_flags()
    add_generation_parsers(sub, common)
    add_retrieve_parser(sub)
    add_train_parser(sub)
    add_demo_parser(sub)
    for subparser in sub.choices.values():
        subparser.formatter_class = HelpFormatter
    parser.subcommand_parsers = sub.choices  # for errors in the subcommand's own usage
    return parser


def parse(argv: list[str] | None) -> dict:
    """The parsed flags; an unknown flag is reported with the usage of its subcommand."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.subcommand_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return vars(args)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    name, rank = args.pop("command"), process_rank()
    log_level = configure_logging(name, rank)
    command = {"caption": caption, "vqa": vqa, "chat": chat, "retrieve": lambda **kw: retrieve_main(kw),
               "train": lambda **kw: train_main(kw), "demo": lambda **kw: demo_main(kw)}[name]
    threads = args.pop("threads", None)
    # other ranks print nothing; their log errors (the handler keeps the real stderr) and the
    # traceback of a crash (printed after main returns) still show
    quiet = open(os.devnull, "w") if rank != 0 else None
    try:
        with contextlib.ExitStack() as stack:
            if quiet is not None:
                stack.enter_context(contextlib.redirect_stdout(quiet))
                stack.enter_context(contextlib.redirect_stderr(quiet))
            set_threads(threads)
            return command(**args)
    except USER_ERRORS as err:
        if rank == 0:
            print(f"blip2-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        logging.getLogger("blip2_fast").setLevel(log_level)
        if quiet is not None:
            quiet.close()


__all__ = ["main", "build_parser", "caption", "vqa", "chat", "CLIError", "USER_ERRORS", "HelpFormatter"]
