"""Training: the loop (Trainer), the chunked loss, AdamW + schedule + global-norm clipping, metrics."""

from .loss import chunked_cross_entropy
from .metrics import SavedTensorCounter, attention_pairs, model_flops_per_step
from .optim import build_optimizer, build_scheduler, clip_grad_norm, lr_factor
from .setup import validate_job
from .trainer import Trainer

__all__ = ["Trainer", "chunked_cross_entropy", "SavedTensorCounter", "attention_pairs", "model_flops_per_step",
           "build_optimizer", "build_scheduler", "clip_grad_norm", "lr_factor", "validate_job"]
