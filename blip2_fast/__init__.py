"""blip2_fast: a performance-first BLIP-2 engine, used in place of transformers' BLIP-2 classes.

    import blip2_fast
    model = blip2_fast.Blip2ForConditionalGeneration.from_pretrained(folder_or_hub_id, dtype=torch.bfloat16)

Heavy modules (models, kernels) are imported on first use, so `import blip2_fast` stays cheap.
"""
from importlib import import_module

from .config import Blip2Config, ConfigError  # noqa: F401
from .versions import check_transformers

check_transformers()  # one warning when the installed transformers is outside the tested range

__version__ = "0.1.0"

_LAZY = {
    "Blip2ForConditionalGeneration": "blip2_fast.models.blip2",
    "Blip2ForImageTextRetrieval": "blip2_fast.models.retrieval_heads",
    "CheckpointError": "blip2_fast.loading",
    "Engine": "blip2_fast.engine",
    "EngineError": "blip2_fast.engine",
    "Settings": "blip2_fast.engine",
    "Retriever": "blip2_fast.retrieval",
    "GenerationConfig": "blip2_fast.generation",
    "quantize_": "blip2_fast.quantization",
    "Int8WeightOnlyConfig": "blip2_fast.quantization",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blip2_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
