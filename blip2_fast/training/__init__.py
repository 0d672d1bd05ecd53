"""Training: stage-1 representation learning (ITC + ITM + ITG), stage-2 generative learning
(LM / prefix-LM), captioning and VQA finetuning, and the loop that drives them (`train`,
`blip2-fast train`)."""
from .losses import gather_with_grad, itc_loss, itc_similarities, itg_loss, sample_negatives
from .stage1 import Blip2Stage1

_LAZY = {
    "train": "blip2_fast.training.loop", "TrainConfig": "blip2_fast.training.train_config",
    "Blip2Stage2": "blip2_fast.training.stage2", "LMBatchBuilder": "blip2_fast.training.text_batches",
    "build_vision_cache": "blip2_fast.training.feature_cache",
    "VisionFeatureCache": "blip2_fast.training.feature_cache",
    "read_records": "blip2_fast.training.data", "PairDataset": "blip2_fast.training.data",
    "ResumableSampler": "blip2_fast.training.data", "DataError": "blip2_fast.training.data",
}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blip2_fast.training' has no attribute {name!r}")


__all__ = ["Blip2Stage1", "gather_with_grad", "itc_loss", "itc_similarities", "itg_loss", "sample_negatives",
           *_LAZY]
