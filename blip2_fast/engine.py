"""The inference engine: a loaded BLIP-2 model with its tokenizers, (pixels, prompts) -> texts.

- `resolve_model`: a folder, a hub id, or the shipped default model of a kind.
- `Settings` and `settings_for(task, ...)`: generation settings with the task defaults
  (captioning, VQA, chat) filled in and checked.
- `Engine`: builds inputs exactly as transformers' `Blip2Processor` does (same ids: the
  tokenised prompt, left-padded, behind `num_query_tokens` image placeholders), feeds a
  question-reading Q-Former its question, and returns only the new text (as LAVIS does: a
  caption prompt or a question is not repeated). Prompt building lives here too: the VQA
  template of the LLM family, and chat turns concatenated into one prompt within the LLM's
  positions.

Every problem a user can fix (no such folder, no tokenizer, a template without its slot,
impossible settings) raises `EngineError` or `TokenizerError` with one line naming it.
"""
from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass

import torch

from .config import Blip2Config
from .images import ImageSpec
from .loading import ITM_HEAD, LLM_PREFIX, CheckpointError, checkpoint_keys, resolve_folder
from .models.blip2 import Blip2ForConditionalGeneration
from .tokenizers import load_qformer_tokenizer, load_tokenizer, qformer_question_inputs

# The paper's inference defaults: beam search for all three tasks; short answers for VQA and chat
DEFAULTS = {
    "caption": dict(beams=5, max_new_tokens=30, min_new_tokens=0, length_penalty=1.0),
    "vqa": dict(beams=5, max_new_tokens=10, min_new_tokens=0, length_penalty=-1.0),
    "chat": dict(beams=5, max_new_tokens=30, min_new_tokens=0, length_penalty=-1.0),
}
TEMPLATES = {"decoder": "Question: {} Answer:", "encoder-decoder": "Question: {} Short answer:"}
MAX_LENGTH_PENALTY = 20.0
HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")
DEFAULT_MODELS = {"generation": "blip2-shapes", "retrieval": "blip2-shapes-itm"}


class EngineError(Exception):
    """A problem the user can fix (model, device, prompt, settings); one line names it."""


@dataclass
class Settings:
    beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    length_penalty: float = 1.0


def settings_for(task: str, beams: int | None = None, max_new_tokens: int | None = None,
                 min_new_tokens: int | None = None, length_penalty: float | None = None) -> Settings:
    """`Settings` for task caption|vqa|chat: what is given, the task's defaults for the rest."""
    given = dict(beams=beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                 length_penalty=length_penalty)
    settings = Settings(**{k: DEFAULTS[task][k] if v is None else v for k, v in given.items()})
    if settings.beams < 1 or settings.max_new_tokens < 1 or settings.min_new_tokens < 0:
        raise EngineError(f"need --beams >= 1, --max-new-tokens >= 1 and --min-new-tokens >= 0; got {settings.beams}, "
                          f"{settings.max_new_tokens} and {settings.min_new_tokens}")
    # beam scores divide by length ** penalty: far outside BLIP-2's -1..1 that overflows a float
    if not -MAX_LENGTH_PENALTY <= settings.length_penalty <= MAX_LENGTH_PENALTY:
        raise EngineError(f"--length-penalty must be a number between {-MAX_LENGTH_PENALTY} and {MAX_LENGTH_PENALTY}, "
                          f"got {settings.length_penalty}")
    return settings


def default_model(kind: str = "generation") -> str | None:
    """The miniature BLIP-2 folder of that kind shipped inside the package, or None if this install has none."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model", DEFAULT_MODELS[kind])
    return folder if os.path.exists(os.path.join(folder, "config.json")) else None


def resolve_model(model: str | None, kind: str = "generation") -> str:
    """A local folder, or a hub id fetched through huggingface_hub; without one, the shipped
    default model of that kind (captioning/VQA/chat, or retrieval); EngineError otherwise."""
    if not model:
        model = default_model(kind)
    if not model:
        raise EngineError("no model given and this install ships no default model: pass --model with a BLIP-2 "
                          "folder or a hub id (e.g. --model Salesforce/blip2-opt-2.7b)")
    if os.path.isdir(model):
        folder = model
    elif os.path.exists(model):
        raise EngineError(f"--model {model}: is a file; expected a model folder or a hub id")
    elif not HUB_ID.fullmatch(model):
        raise EngineError(f"--model {model}: no such folder")
    else:
        try:
            folder = resolve_folder(model)
        except CheckpointError as err:
            raise EngineError(f"--model {model}: no such folder, and {err}") from None
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise EngineError(f"--model {model}: {folder} has no config.json; is it a BLIP-2 model folder?")
    return folder


def default_device(device: str | None = None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise EngineError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise EngineError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise EngineError(f"--device {device}: Apple's MPS is not available on this machine (use --device cpu)")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise EngineError(f"--device {device}: models run on cpu, cuda or mps devices")
    return device


def set_threads(threads: int | None) -> None:
    """--threads: the CPU threads torch uses for its operators (None: torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise EngineError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def check_question(question: str) -> None:
    """An empty question is refused: the model would answer a bare template."""
    if not question or not question.strip():
        raise EngineError("--question is empty: ask something about the image")


def require_generation_folder(folder: str) -> None:
    """A captioning/VQA model needs an LLM: a retrieval folder is named as such, rather than
    failing later on a list of missing language_model keys or a config without text_config."""
    keys = checkpoint_keys(folder)
    if not any(k.startswith(LLM_PREFIX) for k in keys):
        kind = "an image-text retrieval folder (ITM/ITC heads, no LLM)" if ITM_HEAD in keys else \
            "a model without an LLM (no language_model.* weights)"
        hint = f"; use it with `blip2-fast retrieve --model {folder}`" if ITM_HEAD in keys else ""
        raise EngineError(f"--model {folder}: {kind}; caption, vqa and chat need a captioning model "
                          f"(Blip2ForConditionalGeneration){hint}")
    if Blip2Config.from_json_file(os.path.join(folder, "config.json")).text is None:
        raise EngineError(f"--model {folder}: config.json has no text_config, though the weights hold an LLM "
                          f"(language_model.*); add the LLM's text_config")


class Engine:
    """A loaded model with its tokenizer and image settings: (pixels, prompts) -> texts.

    A model whose Q-Former was finetuned to read the question (`model.reads_question`, BLIP-2's
    VQA finetune) also gets each question through `qformer_tokenizer` (its folder's
    `qformer_tokenizer/`); a caption, with no question, runs the queries alone."""

    def __init__(self, model, tokenizer, spec: ImageSpec, qformer_tokenizer=None):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.config = model.config
        self.qformer_tokenizer = qformer_tokenizer

    @classmethod
    def load(cls, model: str | None, dtype: str | None = None, device: str | None = None) -> "Engine":
        """Resolve `model` (folder, hub id, or the shipped default), load it on `device` (CUDA
        when available) in `dtype` (bf16 on CUDA, fp32 on the CPU unless given)."""
        folder = resolve_model(model)
        require_generation_folder(folder)
        tokenizer = load_tokenizer(folder)
        device = default_device(device)
        # bf16 on GPUs: BLIP-2 ran OPT in fp16 but FlanT5 in bf16 (fp16 overflows); bf16 suits both
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        net = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=device)
        qformer_tokenizer = load_qformer_tokenizer(
            folder, why="its Q-Former reads the question (config vqa_qformer_question)") if net.reads_question else None
        return cls(net, tokenizer, ImageSpec.from_folder(folder, net.config.vision.image_size), qformer_tokenizer)

    @property
    def template(self) -> str:
        """The VQA prompt of this model's LLM family, with {} where the question goes."""
        return TEMPLATES["encoder-decoder" if self.config.is_encoder_decoder else "decoder"]

    def question_template(self, prompt: str | None = None) -> str:
        """`prompt` (a template with {}) or the family's default; EngineError without a slot."""
        template = prompt or self.template
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as err:  # a lone brace
            raise EngineError(f"--prompt {template!r}: not a template ({err}); write a literal brace as {{{{ or }}}}") \
                from None
        if fields != [""]:
            raise EngineError(f"--prompt {template!r}: a question template needs '{{}}' exactly once, where the "
                              f"question goes (found {len(fields)} fields); write a literal brace as {{{{ or }}}}")
        return template

    def encode(self, prompts: list[str]):
        """input_ids and attention_mask exactly as Blip2Processor makes them: the tokenised
        prompts, left-padded, behind num_query_tokens image placeholders. An empty prompt gives
        what captioning without a prompt needs: BOS for OPT, EOS for T5 (as LAVIS does)."""
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
        limit = self.config.qformer.max_position_embeddings
        out, n_long = qformer_question_inputs(self.qformer_tokenizer, questions, limit)
        if n_long:
            raise EngineError(f"a question is longer than the Q-Former's {limit} positions")
        return out

    def generate(self, pixel_values, prompts: list[str], settings: Settings,
                 questions: list[str | None] | None = None) -> list[str]:
        """Texts after each prompt. questions: the bare question of each row (None for a caption),
        fed to the Q-Former when the model reads them."""
        ids, mask = self.encode(prompts)
        self.check_fits(ids, settings)
        if questions is not None and len(questions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(questions)} questions")
        out = self.model.generate(pixel_values, input_ids=ids, attention_mask=mask, num_beams=settings.beams,
                                  max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                                  length_penalty=settings.length_penalty,
                                  **self.encode_questions(questions or [None] * len(prompts)))
        # decoder-only: prompt ids come back in front; encoder-decoder: the decoder start token
        new = out[:, 1:] if self.config.is_encoder_decoder else out[:, ids.shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)]

    def check_fits(self, ids: torch.Tensor, settings: Settings) -> None:
        """EngineError, before any model work, for a prompt holding the image placeholder token
        or one that with --max-new-tokens overruns the LLM's positions (OPT; T5 has no limit)."""
        Q, tok = self.config.num_query_tokens, self.config.image_token_index
        if tok is not None and int((ids[:, Q:] == tok).sum()):
            raise EngineError(f"the prompt contains the image placeholder token (id {tok}), which only the "
                              f"{Q} image queries may use")
        limit = getattr(self.config.text, "max_position_embeddings", None)
        used = ids.shape[1] + (0 if tok is not None else Q)  # without placeholders the model prepends them
        if limit and used + settings.max_new_tokens > limit:
            raise EngineError(f"the prompt takes {used} of the LLM's {limit} positions ({Q} of them image queries) "
                              f"and --max-new-tokens {settings.max_new_tokens} more: shorten the prompt or lower "
                              f"--max-new-tokens to at most {max(limit - used, 0)}")

    def prompt_length(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"]) + self.config.num_query_tokens

    def chat_prompt(self, history: list[str], turn: str, max_new_tokens: int) -> str:
        """The conversation so far and this turn as one prompt ("Question: q1 Answer: a1
        Question: q2 Answer:"). An LLM with a fixed number of positions (OPT) forgets the
        oldest turns, dropped from `history` in place, rather than fail."""
        limit = getattr(self.config.text, "max_position_embeddings", None)
        while history and limit and self.prompt_length(" ".join(history + [turn])) + max_new_tokens > limit:
            history.pop(0)
        return " ".join(history + [turn])


__all__ = ["Engine", "EngineError", "Settings", "settings_for", "DEFAULTS", "TEMPLATES", "default_model",
           "resolve_model", "default_device", "set_threads", "check_question", "require_generation_folder"]
