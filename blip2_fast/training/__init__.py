"""Training: stage-1 representation learning (ITC + ITM + ITG) on a frozen image encoder."""
from .losses import gather_with_grad, itc_loss, itc_similarities, itg_loss, sample_negatives
from .stage1 import Blip2Stage1

__all__ = ["Blip2Stage1", "gather_with_grad", "itc_loss", "itc_similarities", "itg_loss", "sample_negatives"]
