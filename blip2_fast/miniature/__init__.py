"""The miniature BLIP-2 shipped with the package, recipe step 1: its architecture and the pretraining of the
models BLIP-2 keeps frozen (ViT, OPT LM) and of the text encoder that initialises the Q-Former.

    python -m blip2_fast.miniature pretrain --out DIR [--quick]

runs the whole step (tokenizers, three pretrainings, one assembled transformers-format BLIP-2
folder in DIR/initial); each part is also a function (see the submodules). Submodules import
torch and the models on use, so `import blip2_fast.miniature` stays cheap.
"""
from importlib import import_module

_LAZY = {
    "miniature_config": "preset", "image_spec": "preset",
    "train_qformer_tokenizer": "qformer_tokenizer",
    "pretrain_vision": "pretrain_vision", "pretrain_lm": "pretrain_lm",
    "pretrain_text_encoder": "pretrain_text_encoder",
    "assemble_initial_model": "assemble",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
