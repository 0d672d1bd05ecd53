"""`blip2-fast caption|vqa|chat`: argument parsing and printing over `blip2_fast.engine.Engine`.

    blip2-fast caption IMG... [--model FOLDER_OR_HUB_ID] [--prompt "a photo of"] [--json]
    blip2-fast vqa IMG --question "what is this?" [--model ...]
    blip2-fast chat IMG [--model ...]        (questions from stdin; EOF or 'exit' ends)

Text output: the caption alone for one image, `path<TAB>caption` per line for several.
`--json`: one JSON object per line. `caption` over several files skips an unreadable one, saying
why on stderr, and ends with a line counting them (`--strict`: stop at the first instead).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator, TextIO

from tqdm import tqdm

from ..engine import DEFAULTS, Engine, EngineError, check_question, settings_for
from ..images import ImageError, check_image, check_images, load_images, open_images, preprocess


def _emit(out: TextIO | None, as_json: bool, record: dict, text: str) -> None:
    # sys.stdout is looked up per call, not bound as a default, so redirection (tests) works
    print(json.dumps(record, ensure_ascii=False) if as_json else text, file=out or sys.stdout, flush=True)


def _batches(paths: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(paths), size):
        yield paths[i:i + size]


def report_skipped(errors: list[ImageError]) -> None:
    for err in errors:
        tqdm.write(f"blip2-fast: skipped {err}", file=sys.stderr)  # clean beside an active progress bar


def caption(images: list[str], model: str | None, prompt: str | None = None, beams: int | None = None,
            max_new_tokens: int | None = None, min_new_tokens: int | None = None,
            length_penalty: float | None = None, dtype: str | None = None, device: str | None = None,
            batch_size: int = 8, json_output: bool = False, out: TextIO | None = None, strict: bool = False) -> int:
    """Caption every image, `batch_size` at a time; progress on stderr. An unreadable image is
    skipped with its reason on stderr (strict: it stops the command, as does a lone image)."""
    if batch_size < 1:
        raise EngineError(f"--batch-size must be >= 1, got {batch_size}")
    # fail before minutes of model loading, not after
    readable, skipped = check_images(images, strict=strict or len(images) == 1)
    report_skipped(skipped)
    if not readable:
        raise ImageError(f"none of the {len(images)} images could be read")
    settings = settings_for("caption", beams, max_new_tokens, min_new_tokens, length_penalty)
    engine = Engine.load(model, dtype, device)
    bar = tqdm(total=len(readable), unit="img", file=sys.stderr, disable=len(readable) <= batch_size)
    with bar:  # closed on an error too, so that the error message starts a line of its own
        for chunk in _batches(readable, batch_size):
            decoded, pictures, failed = open_images(chunk, strict=strict or len(images) == 1)
            report_skipped(failed)
            skipped += failed
            texts = engine.generate(preprocess(pictures, engine.spec), [prompt or ""] * len(pictures), settings) \
                if pictures else []
            for path, text in zip(decoded, texts):
                _emit(out, json_output, {"image": path, "caption": text},
                      text if len(images) == 1 else f"{path}\t{text}")
            bar.update(len(chunk))
    if len(skipped) == len(images):  # every header read, no image decoded
        raise ImageError(f"none of the {len(images)} images could be decoded")
    if skipped:
        print(f"blip2-fast: {len(images) - len(skipped)} of {len(images)} images captioned, {len(skipped)} skipped "
              f"(reasons above; --strict stops at the first)", file=sys.stderr)
    return 0


def vqa(image: str, question: str, model: str | None, prompt: str | None = None, beams: int | None = None,
        max_new_tokens: int | None = None, min_new_tokens: int | None = None, length_penalty: float | None = None,
        dtype: str | None = None, device: str | None = None, json_output: bool = False,
        out: TextIO | None = None) -> int:
    """Answer one question about one image ("Question: {} Answer:" for OPT, "... Short answer:" for T5)."""
    check_question(question)
    check_image(image)
    settings = settings_for("vqa", beams, max_new_tokens, min_new_tokens, length_penalty)
    engine = Engine.load(model, dtype, device)
    answer = engine.generate(load_images([image], engine.spec), [engine.question_template(prompt).format(question)],
                             settings, questions=[question])[0]
    _emit(out, json_output, {"image": image, "question": question, "answer": answer}, answer)
    return 0


def chat(image: str, model: str | None, prompt: str | None = None, beams: int | None = None,
         max_new_tokens: int | None = None, min_new_tokens: int | None = None, length_penalty: float | None = None,
         dtype: str | None = None, device: str | None = None, json_output: bool = False,
         stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Questions from `stdin`, one per line; each answer joins the conversation, which is
    concatenated into the next prompt ("Question: q1 Answer: a1 Question: q2 Answer:")."""
    check_image(image)
    settings = settings_for("chat", beams, max_new_tokens, min_new_tokens, length_penalty)
    engine = Engine.load(model, dtype, device)
    template = engine.question_template(prompt)
    pixels = load_images([image], engine.spec)
    history: list[str] = []
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    if interactive:
        print(f"Ask about {image}; 'exit' or end of input (Ctrl-D) ends the chat.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        question = line.strip()
        if question.lower() in ("exit", "quit"):
            break
        if not question:
            continue
        turn = template.format(question)
        try:
            prompt = engine.chat_prompt(history, turn, settings.max_new_tokens)
            # the LLM reads the conversation; a question-reading Q-Former reads the question at hand
            answer = engine.generate(pixels, [prompt], settings, questions=[question])[0]
        except EngineError as err:  # this turn cannot be answered (too long...): say so, keep chatting
            print(f"blip2-fast: error: {err}", file=sys.stderr)
            continue
        history.append(f"{turn} {answer}")
        _emit(out, json_output, {"question": question, "answer": answer}, answer)
    return 0


def add_generation_parsers(sub, common: argparse.ArgumentParser) -> None:
    """caption, vqa and chat; `common` holds the model, device and generation flags."""
    p = sub.add_parser("caption", parents=[common], help="caption images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to caption, in the order printed")
    p.add_argument("--prompt", help='text the caption continues, e.g. "a photo of" (default: none)')
    p.add_argument("--batch-size", type=int, default=8, help="images generated together")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of "
                                                         "skipping it")
    p = sub.add_parser("vqa", parents=[common], help="answer a question about an image")
    p.add_argument("image", metavar="IMAGE", help="the image file the question is about")
    p.add_argument("--question", "-q", required=True, help="the question to answer (not empty)")
    p.add_argument("--prompt", help='question template with one {} for the question (default: "Question: {} '
                                    'Answer:" for OPT, "Question: {} Short answer:" for FlanT5)')
    p = sub.add_parser("chat", parents=[common], help="questions from stdin about one image")
    p.add_argument("image", metavar="IMAGE", help="the image file the conversation is about")
    p.add_argument("--prompt", help="template of each question with one {} (default: as for vqa)")


def generation_flags() -> argparse.ArgumentParser:
    """The flags caption, vqa and chat share."""
    def default(key: str) -> str:
        values = {task: DEFAULTS[task][key] for task in ("caption", "vqa", "chat")}
        return str(values["caption"]) if len(set(values.values())) == 1 else \
            ", ".join(f"{task} {value}" for task, value in values.items())

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="BLIP-2 model folder or Hugging Face hub id (default: the shipped "
                                        "miniature model of the world of shapes)")
    common.add_argument("--beams", type=int, help=f"beam search width; 1 is greedy (default: {default('beams')})")
    common.add_argument("--max-new-tokens", type=int, help=f"most tokens generated per answer "
                                                           f"(default: {default('max_new_tokens')})")
    common.add_argument("--min-new-tokens", type=int, help=f"fewest tokens generated before the end token is "
                                                           f"allowed (default: {default('min_new_tokens')})")
    common.add_argument("--length-penalty", type=float, help=f"beam score exponent on length; below 0 favours "
                                                             f"short answers (default: {default('length_penalty')})")
    common.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto"],
                        help="weights' dtype (default: float32 on CPU, bfloat16 on CUDA)")
    common.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    common.add_argument("--threads", type=int, help="CPU threads torch may use (default: torch's choice, "
                                                    "usually one per core)")
    common.add_argument("--json", dest="json_output", action="store_true", help="one JSON object per line")
    return common


__all__ = ["caption", "vqa", "chat", "add_generation_parsers", "generation_flags"]
