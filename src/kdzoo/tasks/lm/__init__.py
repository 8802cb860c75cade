"""Language-model distillation on Hugging Face transformers (``pip install 'kdzoo[lm]'``).

The losses (`kdzoo.tasks.lm.losses`, `kdzoo.tasks.lm.alignment`) are plain torch and import without
transformers; models and tokenizers need the extra and say so in one line when it is missing.  `LMTask` is the
language-model task on the engine's Trainer.
"""
from .alignment import (attention_kl_loss, hidden_cosine_loss, hidden_mse_loss, layer_map, value_relation_loss,
                        value_relations)
from .losses import (forward_kl_loss, generalized_jsd_loss, masked_mean, reverse_kl_loss, sparse_forward_kl_loss,
                     sparse_generalized_jsd_loss, sparse_log_probs, sparse_reverse_kl_loss, sparse_total_variation_loss,
                     token_divergence, total_variation_loss)
from .objectives import (LM_LOSSES, LMContext, LMObjective, SampledTeacher, SparseTeacher, TeacherChunk, TokenObjective,
                         create_lm_loss, register_lm_loss)
from . import cross_tokenizer, mi_alpha  # noqa: E402,F401  (losses registered in their own modules: uld, gold, mi_alpha)
from .task import LMTask, StudentStep

__all__ = [
    "forward_kl_loss", "reverse_kl_loss", "generalized_jsd_loss", "total_variation_loss",
    "sparse_forward_kl_loss", "sparse_reverse_kl_loss", "sparse_generalized_jsd_loss", "sparse_total_variation_loss",
    "sparse_log_probs", "token_divergence", "masked_mean",
    "hidden_mse_loss", "hidden_cosine_loss", "attention_kl_loss", "value_relation_loss", "value_relations",
    "layer_map", "LM_LOSSES", "LMContext", "LMObjective", "SparseTeacher", "SampledTeacher", "TeacherChunk",
    "TokenObjective", "create_lm_loss", "register_lm_loss",
    "LMTask", "StudentStep",
]
