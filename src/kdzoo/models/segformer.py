"""SegFormer (Xie et al. 2021) from Hugging Face transformers, built from a config with random weights.

``hf:segformer`` builds ``transformers.SegformerForSemanticSegmentation`` from a ``SegformerConfig`` written out
here (nothing is downloaded): a Mix Transformer (MiT) encoder of four stages, each an overlapping patch embedding
(a strided conv and a LayerNorm), efficient self-attention blocks and a LayerNorm, at 1/4, 1/8, 1/16 and 1/32 of
the image; and the all-MLP decode head, which projects every stage to ``decoder_hidden_size``, upsamples them to
1/4, fuses them (1x1 conv, BN, ReLU) and classifies each position (1x1 conv).  The model returns the logits at 1/4
of the image, which `kdzoo.distiller.logits_of` resizes to the masks.

Variants ``b0``..``b5`` are the published MiT sizes (NVIDIA's ``nvidia/mit-b0``..``mit-b5`` configs: widths, depths,
heads, decoder width); ``tiny`` is ours, small enough for CPU tests.  transformers is the optional extra
``kdzoo[lm]``; it is imported when a model is built, never when kdzoo is imported.

Taps (``kdzoo_taps``): ``stage:0..3`` the four stage outputs as (B, C, h, w) maps; ``patch_embed:0..3`` the four
overlapping patch embeddings, (B, N, C) tokens after their LayerNorm; ``patch_embed_input:0..3`` what enters each
patch embedding (the image, then the stage maps 0..2); ``decoder:0`` (also ``penultimate``) the decode head's fused
feature entering its classifier; ``logits:0`` the classifier's output at 1/4 of the image.
"""
from __future__ import annotations

import copy
import functools
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import PositiveInt, UnitInterval, register_model

__all__ = ["SEGFORMER_VARIANTS", "segformer", "segformer_taps"]

SEGFORMER_PAPER = "Xie et al. 2021, SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers"
NUM_STAGES = 4

# MiT sizes of the published configs (nvidia/mit-b0..b5; the SegFormer paper's Table 6): stage widths, blocks per
# stage, attention heads per stage, and the decode head's width (256 for B0/B1, 768 for B2-B5).
SEGFORMER_VARIANTS: dict[str, dict[str, tuple[int, ...] | int]] = {
    "tiny": {"hidden_sizes": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "num_attention_heads": (1, 2, 4, 8),
             "decoder_hidden_size": 32},
    "b0": {"hidden_sizes": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "num_attention_heads": (1, 2, 5, 8),
           "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": (64, 128, 320, 512), "depths": (2, 2, 2, 2), "num_attention_heads": (1, 2, 5, 8),
           "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 4, 6, 3), "num_attention_heads": (1, 2, 5, 8),
           "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 4, 18, 3), "num_attention_heads": (1, 2, 5, 8),
           "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 8, 27, 3), "num_attention_heads": (1, 2, 5, 8),
           "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 6, 40, 3), "num_attention_heads": (1, 2, 5, 8),
           "decoder_hidden_size": 768},
}
# shared by every variant (the published configs): patch embeddings 7/4 then 3/2, attention key/value reduction
# ratios, MLP expansion, LayerNorm eps
SEGFORMER_FIXED = {"patch_sizes": [7, 3, 3, 3], "strides": [4, 2, 2, 2], "sr_ratios": [8, 4, 2, 1],
                   "mlp_ratios": [4, 4, 4, 4], "layer_norm_eps": 1e-6}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("hf:segformer needs the optional extra: pip install 'kdzoo[lm]'") from None
    return transformers


@functools.cache
def _segmenter_class() -> type:
    """transformers' SegFormer segmenter whose forward takes images and returns the logits tensor alone (the state
    dict keys stay transformers', so its published weights load).  Made on first use, as transformers is optional."""
    base = _transformers().SegformerForSemanticSegmentation

    class SegformerSegmenter(base):
        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # the logits, at 1/4 of the image
            return super().forward(pixel_values).logits

    return SegformerSegmenter


def _sizes(name: str, given: Optional[Sequence[int]], default: Sequence[int]) -> list[int]:
    sizes = list(default if given is None else given)
    if len(sizes) != NUM_STAGES:
        raise ConfigError(f"hf:segformer: {name} needs {NUM_STAGES} entries (one per MiT stage), got {sizes}")
    return sizes


def segformer_taps(model: nn.Module) -> dict:
    """The ``kdzoo_taps`` of a transformers SegFormer segmenter.  transformers 5 has one module per stage whose
    output is the stage's map; transformers 4 keeps the encoder's parts in lists, and a stage's map is only seen
    entering the decode head's projection of it."""
    modules = dict(model.named_modules())
    if "segformer.stages.0" in modules:
        stages = [f"segformer.stages.{i}" for i in range(NUM_STAGES)]
        embeddings = [f"segformer.stages.{i}.patch_embeddings" for i in range(NUM_STAGES)]
    else:
        stages = [f"decode_head.linear_c.{i}:input" for i in range(NUM_STAGES)]
        embeddings = [f"segformer.encoder.patch_embeddings.{i}" for i in range(NUM_STAGES)]
    decoder = "decode_head.classifier:input"
    return {"stages": stages, "penultimate": decoder, "decoder": [decoder], "logits": ["decode_head.classifier"],
            # a patch embedding returns (tokens, h, w); its LayerNorm gives the tokens alone
            "patch_embed": [f"{path}.layer_norm" for path in embeddings],
            "patch_embed_input": [f"{path}:input" for path in embeddings], "num_prefix_tokens": 0}


@register_model("hf:segformer", family="segmentation", paper=SEGFORMER_PAPER)
def segformer(num_classes: int = 19, in_channels: int = 3,
              variant: Literal["tiny", "b0", "b1", "b2", "b3", "b4", "b5"] = "b0",
              hidden_sizes: Optional[Sequence[PositiveInt]] = None, depths: Optional[Sequence[PositiveInt]] = None,
              num_attention_heads: Optional[Sequence[PositiveInt]] = None,
              decoder_hidden_size: Optional[PositiveInt] = None, drop_path_rate: UnitInterval = 0.1) -> nn.Module:
    """SegFormer with random weights: MiT ``variant`` (tiny, b0..b5), whose stage widths, depths, heads and decoder
    width the other options may replace.  ``drop_path_rate`` 0.1 and the decode head's dropout 0.1 are the
    published configs'.

    Options:
        variant: MiT size: b0..b5 (the published configs) or tiny (widths 8-64, one block per stage, CPU tests)
        hidden_sizes: the four stage widths (null: the variant's)
        depths: the four stages' block counts (null: the variant's)
        num_attention_heads: the four stages' head counts, each dividing its width (null: the variant's)
        decoder_hidden_size: the decode head's width (null: the variant's)
        drop_path_rate: stochastic depth rate of the deepest block (linear from 0)
    """
    sizes = SEGFORMER_VARIANTS[variant]
    widths = _sizes("hidden_sizes", hidden_sizes, sizes["hidden_sizes"])
    heads = _sizes("num_attention_heads", num_attention_heads, sizes["num_attention_heads"])
    for width, head_count in zip(widths, heads):
        if width % head_count:
            raise ConfigError(f"hf:segformer: hidden_sizes {widths} are not divisible by num_attention_heads {heads}; "
                              "give num_attention_heads that divide each width")
    transformers = _transformers()
    config = transformers.SegformerConfig(
        num_channels=in_channels, num_labels=num_classes, num_encoder_blocks=NUM_STAGES, hidden_sizes=widths,
        depths=_sizes("depths", depths, sizes["depths"]), num_attention_heads=heads,
        decoder_hidden_size=decoder_hidden_size or sizes["decoder_hidden_size"], drop_path_rate=drop_path_rate,
        **copy.deepcopy(SEGFORMER_FIXED))
    model = _segmenter_class()(config)
    model.kdzoo_taps = segformer_taps(model)
    return model
