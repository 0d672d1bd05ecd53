"""`blip2-fast` (also `python -m blip2_fast`): captioning, visual question answering and chat.

    blip2-fast caption IMG... --model FOLDER_OR_HUB_ID [--prompt "a photo of"] [--json]
    blip2-fast vqa IMG --question "what is this?" --model ...
    blip2-fast chat IMG --model ...        (questions from stdin; EOF or 'exit' ends)
    blip2-fast train --stage 1|2|caption|vqa --model FOLDER --data FILE ...   (see training/cli.py)

Inputs are built as transformers' `Blip2Processor` builds them (same pixels, same ids: the
tokenised prompt, left-padded, behind `num_query_tokens` image placeholders), so outputs are
the ones transformers would give with the same weights and generation settings. Only the new
tokens are printed, as LAVIS does: a caption prompt or a question is not repeated.

Text output: the caption alone for one image, `path<TAB>caption` per line for several.
`--json`: one JSON object per line. Problems users can fix (missing or unreadable files, no
model, no tokenizer) exit with status 2 and one line on stderr, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterator, TextIO

DEFAULTS = {  # DESIGN.md §1, inference defaults
    "caption": dict(beams=5, max_new_tokens=30, min_new_tokens=0, length_penalty=1.0),
    "vqa": dict(beams=5, max_new_tokens=10, min_new_tokens=0, length_penalty=-1.0),
    "chat": dict(beams=5, max_new_tokens=30, min_new_tokens=0, length_penalty=-1.0),
}
TEMPLATES = {"decoder": "Question: {} Answer:", "encoder-decoder": "Question: {} Short answer:"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")
HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


@dataclass
class Settings:
    beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    length_penalty: float = 1.0


class Engine:
    """A loaded model with its tokenizer and image settings: (pixels, prompts) -> texts.

    A model whose Q-Former was finetuned to read the question (`model.reads_question`, BLIP-2's
    VQA finetune) also gets each question through `qformer_tokenizer` (its folder's
    `qformer_tokenizer/`); a caption, with no question, runs the queries alone."""

    def __init__(self, model, tokenizer, spec, qformer_tokenizer=None):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.config = model.config
        self.qformer_tokenizer = qformer_tokenizer

    @classmethod
    def load(cls, model: str | None, dtype: str | None = None, device: str | None = None) -> "Engine":
        import torch

        from .images import ImageSpec
        from .models.blip2 import Blip2ForConditionalGeneration

        folder = resolve_model(model)
        tokenizer = load_tokenizer(folder)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CLIError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        # bf16 on GPUs: BLIP-2 ran OPT in fp16 but FlanT5 in bf16 (fp16 overflows); bf16 suits both
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        net = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=device)
        qformer_tokenizer = load_qformer_tokenizer(folder) if net.reads_question else None
        return cls(net, tokenizer, ImageSpec.from_folder(folder, net.config.vision.image_size), qformer_tokenizer)

    @property
    def template(self) -> str:
        return TEMPLATES["encoder-decoder" if self.config.is_encoder_decoder else "decoder"]

    def encode(self, prompts: list[str]):
        """input_ids and attention_mask exactly as Blip2Processor makes them: the tokenised
        prompts, left-padded, behind num_query_tokens image placeholders. An empty prompt gives
        what captioning without a prompt needs: BOS for OPT, EOS for T5 (as LAVIS does)."""
        import torch

        Q, tok = self.config.num_query_tokens, self.config.image_token_index
        images = [tok] * Q if tok is not None else []  # old checkpoints: the model prepends the prompt
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt", return_token_type_ids=False)
        placeholders = torch.tensor([images] * len(prompts), dtype=torch.long).view(len(prompts), len(images))
        return (torch.cat([placeholders, enc["input_ids"]], 1),
                torch.cat([torch.ones_like(placeholders), enc["attention_mask"]], 1))

    def encode_questions(self, questions: list[str | None]) -> dict:
        """qformer_input_ids / qformer_attention_mask for a question-reading model ({} for others,
        and for a batch without a question, so that captions take transformers' path exactly)."""
        if self.qformer_tokenizer is None or all(q is None or not q.strip() for q in questions):
            return {}
        from .training.text_batches import qformer_question_inputs

        limit = self.config.qformer.max_position_embeddings
        out, n_long = qformer_question_inputs(self.qformer_tokenizer, questions, limit)
        if n_long:
            raise CLIError(f"a question is longer than the Q-Former's {limit} positions")
        return out

    def generate(self, pixel_values, prompts: list[str], settings: Settings,
                 questions: list[str | None] | None = None) -> list[str]:
        """Texts after each prompt. questions: the bare question of each row (None for a caption),
        fed to the Q-Former when the model reads them."""
        ids, mask = self.encode(prompts)
        if questions is not None and len(questions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(questions)} questions")
        out = self.model.generate(pixel_values, input_ids=ids, attention_mask=mask, num_beams=settings.beams,
                                  max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                                  length_penalty=settings.length_penalty,
                                  **self.encode_questions(questions or [None] * len(prompts)))
        # decoder-only: prompt ids come back in front; encoder-decoder: the decoder start token
        new = out[:, 1:] if self.config.is_encoder_decoder else out[:, ids.shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)]

    def prompt_length(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"]) + self.config.num_query_tokens


DEFAULT_MODELS = {"generation": "blip2-shapes", "retrieval": "blip2-shapes-itm"}


def default_model(kind: str = "generation") -> str | None:
    """The miniature BLIP-2 shipped inside the package (issue 7), or None if this install has none."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model", DEFAULT_MODELS[kind])
    return folder if os.path.exists(os.path.join(folder, "config.json")) else None


def resolve_model(model: str | None, kind: str = "generation") -> str:
    """A local folder, or a hub id fetched through huggingface_hub; without one, the shipped
    default model of that kind (captioning/VQA/chat, or retrieval); CLIError otherwise."""
    from .loading import CheckpointError, resolve_folder

    if not model:
        model = default_model(kind)
    if not model:
        raise CLIError("no model given and this install ships no default model: pass --model with a BLIP-2 "
                       "folder or a hub id (e.g. --model Salesforce/blip2-opt-2.7b)")
    if os.path.isdir(model):
        folder = model
    elif os.path.exists(model):
        raise CLIError(f"--model {model}: is a file; expected a model folder or a hub id")
    elif not HUB_ID.fullmatch(model):
        raise CLIError(f"--model {model}: no such folder")
    else:
        try:
            folder = resolve_folder(model)
        except CheckpointError as err:
            raise CLIError(f"--model {model}: no such folder, and {err}") from None
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise CLIError(f"--model {model}: {folder} has no config.json; is it a BLIP-2 model folder?")
    return folder


def load_tokenizer(folder: str):
    if not any(os.path.exists(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        raise CLIError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one beside the "
                       f"weights, e.g. Blip2Processor.save_pretrained(folder)")
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many types here; all mean "unusable tokenizer"
        raise CLIError(f"{folder}: cannot load the tokenizer ({type(err).__name__}: {err})") from None
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last position
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_qformer_tokenizer(folder: str):
    """The Q-Former's BERT-style tokenizer, saved as `qformer_tokenizer/` in the model folder
    (InstructBLIP's processor layout; our training exports carry it)."""
    path = os.path.join(folder, "qformer_tokenizer")
    if not os.path.isdir(path):
        raise CLIError(f"{folder}: its Q-Former reads the question (config vqa_qformer_question) but the folder has "
                       f"no qformer_tokenizer/ to tokenise it with; copy in the tokenizer it was trained with")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types here; all mean "unusable tokenizer"
        raise CLIError(f"{path}: cannot load the Q-Former tokenizer ({type(err).__name__}: {err})") from None


def _settings(kind: str, beams, max_new_tokens, min_new_tokens, length_penalty) -> Settings:
    given = dict(beams=beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                 length_penalty=length_penalty)
    settings = Settings(**{k: DEFAULTS[kind][k] if v is None else v for k, v in given.items()})
    if settings.beams < 1 or settings.max_new_tokens < 1 or settings.min_new_tokens < 0:
        raise CLIError(f"need --beams >= 1, --max-new-tokens >= 1 and --min-new-tokens >= 0; got {settings.beams}, "
                       f"{settings.max_new_tokens} and {settings.min_new_tokens}")
    return settings


def _emit(out: TextIO | None, as_json: bool, record: dict, text: str) -> None:
    # sys.stdout is looked up per call, not bound as a default, so redirection (tests) works
    print(json.dumps(record, ensure_ascii=False) if as_json else text, file=out or sys.stdout, flush=True)


def _batches(paths: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(paths), size):
        yield paths[i:i + size]


# ---------------------------------------------------------------------------- commands
def caption(images: list[str], model: str | None, prompt: str | None = None, beams: int | None = None,
            max_new_tokens: int | None = None, min_new_tokens: int | None = None,
            length_penalty: float | None = None, dtype: str | None = None, device: str | None = None,
            batch_size: int = 8, json_output: bool = False, out: TextIO | None = None) -> int:
    """Caption every image, `batch_size` at a time; progress on stderr."""
    from tqdm import tqdm

    from .images import check_image, load_images

    if batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {batch_size}")
    for path in images:  # fail before minutes of model loading, not after
        check_image(path)
    settings = _settings("caption", beams, max_new_tokens, min_new_tokens, length_penalty)
    engine = Engine.load(model, dtype, device)
    bar = tqdm(total=len(images), unit="img", file=sys.stderr, disable=len(images) <= batch_size)
    for chunk in _batches(images, batch_size):
        texts = engine.generate(load_images(chunk, engine.spec), [prompt or ""] * len(chunk), settings)
        for path, text in zip(chunk, texts):
            _emit(out, json_output, {"image": path, "caption": text}, text if len(images) == 1 else f"{path}\t{text}")
        bar.update(len(chunk))
    bar.close()
    return 0


def _template(engine: Engine, prompt: str | None) -> str:
    template = prompt or engine.template
    if "{}" not in template:
        raise CLIError(f"--prompt {template!r}: a question template needs '{{}}' where the question goes")
    return template


def vqa(image: str, question: str, model: str | None, prompt: str | None = None, beams: int | None = None,
        max_new_tokens: int | None = None, min_new_tokens: int | None = None, length_penalty: float | None = None,
        dtype: str | None = None, device: str | None = None, json_output: bool = False,
        out: TextIO | None = None) -> int:
    """Answer one question about one image ("Question: {} Answer:" for OPT, "... Short answer:" for T5)."""
    from .images import check_image, load_images

    check_image(image)
    settings = _settings("vqa", beams, max_new_tokens, min_new_tokens, length_penalty)
    engine = Engine.load(model, dtype, device)
    answer = engine.generate(load_images([image], engine.spec), [_template(engine, prompt).format(question)],
                             settings, questions=[question])[0]
    _emit(out, json_output, {"image": image, "question": question, "answer": answer}, answer)
    return 0


def chat(image: str, model: str | None, prompt: str | None = None, beams: int | None = None,
         max_new_tokens: int | None = None, min_new_tokens: int | None = None, length_penalty: float | None = None,
         dtype: str | None = None, device: str | None = None, json_output: bool = False,
         stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Questions from `stdin`, one per line; each answer joins the conversation, which is
    concatenated into the next prompt ("Question: q1 Answer: a1 Question: q2 Answer:")."""
    from .images import check_image, load_images

    check_image(image)
    settings = _settings("chat", beams, max_new_tokens, min_new_tokens, length_penalty)
    engine = Engine.load(model, dtype, device)
    template = _template(engine, prompt)
    pixels = load_images([image], engine.spec)
    limit = getattr(engine.config.text, "max_position_embeddings", None)
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
        # OPT has a fixed number of positions: forget the oldest turns rather than fail
        while history and limit and \
                engine.prompt_length(" ".join(history + [turn])) + settings.max_new_tokens > limit:
            history.pop(0)
        # the LLM reads the conversation; a question-reading Q-Former reads the question at hand
        answer = engine.generate(pixels, [" ".join(history + [turn])], settings, questions=[question])[0]
        history.append(f"{turn} {answer}")
        _emit(out, json_output, {"question": question, "answer": answer}, answer)
    return 0


# ---------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-fast", description="BLIP-2 captioning, VQA and chat.")
    sub = parser.add_subparsers(dest="command", required=True)
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
    p = sub.add_parser("retrieve", parents=[common], help="rank images for texts and texts for images (ITC + ITM rerank)")
    p.add_argument("--images", required=True, metavar="DIR", help="image folder (hidden files, sub-folders skipped)")
    p.add_argument("--texts", required=True, metavar="FILE", help="UTF-8, one text per line, no blank lines")
    p.add_argument("--k", type=int, default=128, help="ITC candidates reranked by ITM per query (clamped to the gallery)")
    p.add_argument("--top", type=int, default=5, help="results printed per query")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache", metavar="FILE.safetensors", help="gallery feature cache, reused for the same model")
    from .miniature.demo import add_demo_parser
    from .training.cli import add_train_parser
    add_train_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .images import ImageError
    from .loading import CheckpointError

    args = vars(build_parser().parse_args(argv))
    from .retrieval import retrieve_main
    from .miniature.demo import demo_main
    from .training.cli import train_main
    from .training.data import DataError

    command = {"caption": caption, "vqa": vqa, "chat": chat, "retrieve": lambda **kw: retrieve_main(kw),
               "train": lambda **kw: train_main(kw), "demo": lambda **kw: demo_main(kw)}[args.pop("command")]
    try:
        return command(**args)
    except (CLIError, ImageError, CheckpointError, ConfigError, DataError) as err:
        print(f"blip2-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


__all__ = ["main", "caption", "vqa", "chat", "Engine", "Settings", "CLIError", "build_parser"]
