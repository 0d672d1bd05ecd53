"""`blip2-fast caption|vqa|chat`: argument parsing and printing over `blip2_fast.engine.Engine`.

    blip2-fast caption IMG... [--model FOLDER_OR_HUB_ID] [--prompt "a photo of"] [--json]
    blip2-fast vqa IMG --question "what is this?" [--model ...]
    blip2-fast chat IMG [--model ...]        (questions from stdin; EOF or 'exit' ends)

Text output: the caption alone for one image, `path<TAB>caption` per line for several.
`--json`: one JSON object per line.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator, TextIO

from tqdm import tqdm

from ..engine import Engine, EngineError, settings_for
from ..images import check_image, load_images


def _emit(out: TextIO | None, as_json: bool, record: dict, text: str) -> None:
    # sys.stdout is looked up per call, not bound as a default, so redirection (tests) works
    print(json.dumps(record, ensure_ascii=False) if as_json else text, file=out or sys.stdout, flush=True)


def _batches(paths: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(paths), size):
        yield paths[i:i + size]


def caption(images: list[str], model: str | None, prompt: str | None = None, beams: int | None = None,
            max_new_tokens: int | None = None, min_new_tokens: int | None = None,
            length_penalty: float | None = None, dtype: str | None = None, device: str | None = None,
            batch_size: int = 8, json_output: bool = False, out: TextIO | None = None) -> int:
    """Caption every image, `batch_size` at a time; progress on stderr."""
    if batch_size < 1:
        raise EngineError(f"--batch-size must be >= 1, got {batch_size}")
    for path in images:  # fail before minutes of model loading, not after
        check_image(path)
    settings = settings_for("caption", beams, max_new_tokens, min_new_tokens, length_penalty)
    engine = Engine.load(model, dtype, device)
    bar = tqdm(total=len(images), unit="img", file=sys.stderr, disable=len(images) <= batch_size)
    for chunk in _batches(images, batch_size):
        texts = engine.generate(load_images(chunk, engine.spec), [prompt or ""] * len(chunk), settings)
        for path, text in zip(chunk, texts):
            _emit(out, json_output, {"image": path, "caption": text}, text if len(images) == 1 else f"{path}\t{text}")
        bar.update(len(chunk))
    bar.close()
    return 0


def vqa(image: str, question: str, model: str | None, prompt: str | None = None, beams: int | None = None,
        max_new_tokens: int | None = None, min_new_tokens: int | None = None, length_penalty: float | None = None,
        dtype: str | None = None, device: str | None = None, json_output: bool = False,
        out: TextIO | None = None) -> int:
    """Answer one question about one image ("Question: {} Answer:" for OPT, "... Short answer:" for T5)."""
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
        prompt = engine.chat_prompt(history, turn, settings.max_new_tokens)
        # the LLM reads the conversation; a question-reading Q-Former reads the question at hand
        answer = engine.generate(pixels, [prompt], settings, questions=[question])[0]
        history.append(f"{turn} {answer}")
        _emit(out, json_output, {"question": question, "answer": answer}, answer)
    return 0


def add_generation_parsers(sub, common: argparse.ArgumentParser) -> None:
    """caption, vqa and chat; `common` holds the model, device and generation flags."""
    p = sub.add_parser("caption", parents=[common], help="caption images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", help='text the caption continues, e.g. "a photo of"')
    p.add_argument("--batch-size", type=int, default=8)
    p = sub.add_parser("vqa", parents=[common], help="answer a question about an image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--question", "-q", required=True)
    p.add_argument("--prompt", help='question template with {} (default "Question: {} Answer:")')
    p = sub.add_parser("chat", parents=[common], help="questions from stdin about one image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--prompt", help="question template with {}")


def generation_flags() -> argparse.ArgumentParser:
    """The flags caption, vqa and chat share."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="BLIP-2 model folder or Hugging Face hub id (default: the shipped "
                                        "miniature model of the world of shapes)")
    common.add_argument("--beams", type=int, help="beam count (default 5)")
    common.add_argument("--max-new-tokens", type=int, help="caption/chat 30, vqa 10")
    common.add_argument("--min-new-tokens", type=int, help="default 0")
    common.add_argument("--length-penalty", type=float, help="caption 1.0, vqa/chat -1.0 (short answers)")
    common.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "auto"],
                        help="weights' dtype (default float32 on CPU, bfloat16 on CUDA)")
    common.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cuda when available)")
    common.add_argument("--json", dest="json_output", action="store_true", help="one JSON object per line")
    return common


__all__ = ["caption", "vqa", "chat", "add_generation_parsers", "generation_flags"]
