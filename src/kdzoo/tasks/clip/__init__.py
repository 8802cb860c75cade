"""Dual encoders (CLIP) and their distillation: ``kdzoo clip``.

`ClipTask` trains a dual encoder on image-caption pairs on the engine's Trainer: contrastively from its initial
weights (a teacher), or as a student with a registered method (``kdzoo methods --clip``) against a frozen teacher.
`models` holds the dual encoder (transformers' CLIPModel or open_clip) and the tokenizers, `data` the pairs (a
labelled dataset through class-name templates, or captioned images), `evaluation` zero-shot top-1 and retrieval
recall.
"""
from . import methods  # noqa: F401  (registers the methods)
from .method_base import ClipBatch, ClipMethod, clip_contrastive_loss
from .models import ClipOutputs, DualEncoder, load_encoder
from .task import ClipTask, build_distill_task, build_teacher_task

__all__ = ["ClipTask", "ClipMethod", "ClipBatch", "ClipOutputs", "DualEncoder", "clip_contrastive_loss",
           "load_encoder", "build_teacher_task", "build_distill_task"]
