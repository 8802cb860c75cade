"""Dual encoders for ``kdzoo clip``: an image tower and a text tower projected into one embedding space, with CLIP's
learnable logit scale, as one `DualEncoder` whatever they come from:

* transformers' ``CLIPModel`` built from a small ``CLIPConfig`` the YAML describes (``source: config``), or read
  from a folder (``source: transformers``; ``CLIPModel.from_pretrained(path, local_files_only=True)``: a concrete
  class, so no code from the folder ever runs);
* an open_clip model by name and pretrained tag (``source: open_clip``; ``pip install 'kdzoo[clip]'``).

Text goes through a tokenizer: `WordTokenizer`, a vocabulary of the words in the run's captions (no download,
saved with the run as ``tokenizer.json``), a Hugging Face tokenizer folder (`FolderTokenizer`, saved as
``tokenizer/``), or open_clip's own.  Images arrive as the dataset normalises them; an `ImageAdapter` resizes them
to the model's size, repeats a grey channel for an RGB model and maps them to a pretrained model's own
normalisation (``pixel_mean`` / ``pixel_std``) when it has one.

A run folder holds the dual encoder as ``model.safetensors`` (its whole state dict), ``encoder.json`` (how to build
it again: the transformers CLIPConfig or the open_clip name, the image adapter, the tokenizer's kind) and the
tokenizer, so `load_encoder` needs nothing but the folder.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...engine.checkpoint import export_weights, read_weights
from ...engine.runtime import atomic_write
from ...models.pretrained import quiet_progress
from ...errors import CheckpointError, ConfigError
from .config import WORDS, ClipModelConfig
from .inherit import compact_skeleton

ENCODER_FILE = "encoder.json"
WEIGHTS_FILE = "model.safetensors"
WORDS_FILE = "tokenizer.json"
TOKENIZER_DIR = "tokenizer"
TOKEN_PATTERN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # lower-case words and numbers; each other mark alone


def require_transformers():
    """The transformers module, or a ConfigError naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("kdzoo clip needs Hugging Face transformers: pip install 'kdzoo[clip]'") from None
    return transformers


def require_open_clip():
    """The open_clip module, or a ConfigError naming the extra to install."""
    try:
        import open_clip
    except ImportError:
        raise ConfigError("model.source open_clip needs open_clip: pip install 'kdzoo[clip]' "
                          "(open-clip-torch)") from None
    return open_clip


# ---------------------------------------------------------------- what a forward gives


@dataclass
class ClipOutputs:
    """One forward of a dual encoder on a batch of image-caption pairs.

    `image_embeds`, `text_embeds`: the projections L2-normalised (float32), (B, D); `logit_scale`: the multiplier
    of the cosine similarities, exp of the model's learnable log scale (CLIP's 1/temperature); `image_features`,
    `text_features`: the towers' hidden states (embeddings, then each layer's output) when asked, else None;
    `image_projections`, `text_projections`: the projections before normalisation (a method that maps the student
    into the teacher's width projects these, as CLIP-KD does)."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    image_features: Optional[list[torch.Tensor]] = None
    text_features: Optional[list[torch.Tensor]] = None
    image_projections: Optional[torch.Tensor] = None
    text_projections: Optional[torch.Tensor] = None


# ---------------------------------------------------------------- tokenizers


def split_words(text: str) -> list[str]:
    """A caption as lower-case words, numbers and single punctuation marks."""
    return TOKEN_PATTERN.findall(text.lower())


class WordTokenizer:
    """Captions to ids through a vocabulary of the words they contain: ``<start> words... <end>``, cut to
    `max_length` tokens (the end token kept) and padded with ``<pad>`` to exactly `max_length`; unknown words map to
    ``<unk>``.  The end token's id is 3, not 2: transformers' CLIP text tower pools at the first end token, except
    for an end id of 2, where it keeps an old argmax pooling."""

    kind = WORDS
    SPECIALS = ("<pad>", "<unk>", "<start>", "<end>")
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, words: Sequence[str], max_length: int):
        if max_length < 3:
            raise ConfigError(f"model.text.max_length: must be >= 3 (start, a word, end), got {max_length}")
        self.words, self.max_length = list(words), max_length
        self.index = {word: i for i, word in enumerate(self.SPECIALS + tuple(self.words))}

    @classmethod
    def from_captions(cls, captions: Sequence[str], max_length: int) -> "WordTokenizer":
        return cls(sorted({word for caption in captions for word in split_words(caption)}), max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.words)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (len(texts), max_length) int64."""
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            words = [self.index.get(word, self.unk_id) for word in split_words(text)][:self.max_length - 2]
            tokens = [self.bos_id, *words, self.eos_id]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        return ids, mask

    def record(self) -> dict:
        return {"kind": self.kind, "max_length": self.max_length}

    def save(self, run_dir: Path) -> None:
        text = json.dumps({"kind": self.kind, "max_length": self.max_length, "words": self.words})
        atomic_write(Path(run_dir) / WORDS_FILE, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: Path) -> "WordTokenizer":
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["words"], int(data["max_length"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a kdzoo word vocabulary ({err})") from None


class FolderTokenizer:
    """A Hugging Face tokenizer read from a folder (no download, no remote code), padding every caption to
    `max_length` tokens."""

    kind = "folder"

    def __init__(self, folder: str | Path, max_length: int):
        transformers = require_transformers()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                                        trust_remote_code=False)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"tokenizer {folder}: not a Hugging Face tokenizer folder ({first})") from None
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_id(self) -> Optional[int]:
        return self.tokenizer.eos_token_id

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].long()

    def record(self) -> dict:
        return {"kind": self.kind, "max_length": self.max_length}

    def save(self, run_dir: Path) -> None:
        self.tokenizer.save_pretrained(str(Path(run_dir) / TOKENIZER_DIR))


class OpenClipTokenizer:
    """open_clip's tokenizer of a model name (ids padded with 0 to the model's context length)."""

    kind = "open_clip"

    def __init__(self, name: str):
        self.name = name
        self.tokenize = require_open_clip().get_tokenizer(name)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(list(texts)).long()
        return ids, (ids != 0).long()

    def record(self) -> dict:
        return {"kind": self.kind, "name": self.name}

    def save(self, run_dir: Path) -> None:
        """Nothing to write: the name in encoder.json gives the tokenizer back."""


# ---------------------------------------------------------------- images in


@dataclass(frozen=True)
class ImageGeometry:
    """The images a dataset gives: square `size`, `channels`, and the normalisation it applied to pixels in [0, 1]
    (per channel) when it is known (None: e.g. digits, standardised by its own statistics)."""

    size: int
    channels: int
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None


class ImageAdapter(nn.Module):
    """Images in the dataset's normalisation to a model's input: resized (bilinear, antialiased when shrinking) to
    `image_size`, a grey channel repeated for an RGB model, then x * scale + shift per channel (the map from the
    dataset's normalisation to the model's own; none when `scale` is None)."""

    def __init__(self, image_size: int, data_channels: int, model_channels: int,
                 scale: Optional[Sequence[float]] = None, shift: Optional[Sequence[float]] = None):
        super().__init__()
        if data_channels != model_channels and data_channels != 1:
            raise ConfigError(f"model: takes {model_channels}-channel images, the data has {data_channels} channels")
        self.image_size, self.data_channels, self.model_channels = image_size, data_channels, model_channels
        self.register_buffer("scale", None if scale is None else torch.tensor(scale).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("shift", None if shift is None else torch.tensor(shift).view(1, -1, 1, 1),
                             persistent=False)

    @classmethod
    def between(cls, geometry: ImageGeometry, image_size: int, model_channels: int,
                model_cfg: ClipModelConfig) -> "ImageAdapter":
        """The adapter from `geometry`'s images to a model of `image_size` and `model_channels` whose own
        normalisation is `model_cfg.pixel_mean` / `pixel_std` (None: the dataset's)."""
        if model_cfg.pixel_mean is None:
            return cls(image_size, geometry.channels, model_channels)
        if geometry.mean is None:
            raise ConfigError("model.pixel_mean: the dataset's normalisation is not known (it standardises by its own "
                              "statistics), so images cannot be mapped to the model's; leave pixel_mean unset")
        if len(model_cfg.pixel_mean) != model_channels:
            raise ConfigError(f"model.pixel_mean: {model_channels} values needed (the model's channels), got "
                              f"{len(model_cfg.pixel_mean)}")

        def per_channel(values: Sequence[float]) -> list[float]:
            return list(values) * model_channels if len(values) == 1 else list(values)

        data_mean, data_std = per_channel(geometry.mean), per_channel(geometry.std)
        # x_model = (x_data * std_d + mean_d - mean_m) / std_m
        scale = [sd / sm for sd, sm in zip(data_std, model_cfg.pixel_std)]
        shift = [(md - mm) / sm for md, mm, sm in zip(data_mean, model_cfg.pixel_mean, model_cfg.pixel_std)]
        return cls(image_size, geometry.channels, model_channels, scale, shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            shrink = images.shape[-1] > self.image_size
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=shrink)
        if images.shape[1] != self.model_channels:
            images = images.expand(-1, self.model_channels, -1, -1)
        if self.scale is not None:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        return images

    def record(self) -> dict:
        return {"image_size": self.image_size, "data_channels": self.data_channels,
                "model_channels": self.model_channels,
                "scale": None if self.scale is None else self.scale.flatten().tolist(),
                "shift": None if self.shift is None else self.shift.flatten().tolist()}


# ---------------------------------------------------------------- the towers


class TransformersBackbone(nn.Module):
    """transformers' CLIPModel: the vision and text models' pooled outputs through their projections."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def in_channels(self) -> int:
        return int(self.model.config.vision_config.num_channels)

    @property
    def text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def encode_image(self, pixels: torch.Tensor, hidden_states: bool = False):
        out = self.model.vision_model(pixel_values=pixels, output_hidden_states=hidden_states)
        return self.model.visual_projection(out.pooler_output), list(out.hidden_states) if hidden_states else None

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states: bool = False):
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask,
                                    output_hidden_states=hidden_states)
        return self.model.text_projection(out.pooler_output), list(out.hidden_states) if hidden_states else None

    def record(self) -> dict:
        return {"source": "transformers", "clip_config": json.loads(self.model.config.to_json_string())}


class OpenClipBackbone(nn.Module):
    """An open_clip CLIP model (``encode_image`` / ``encode_text``; its text tower pools at the end token itself,
    so the attention mask is not needed).  No hidden states."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model, self.name = model, name

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def _no_hidden_states(self, hidden_states: bool) -> None:
        if hidden_states:
            raise ConfigError(f"open_clip model {self.name}: hidden states are not available here; the method needs "
                              "a transformers CLIPModel (model.source config or transformers)")

    def encode_image(self, pixels: torch.Tensor, hidden_states: bool = False):
        self._no_hidden_states(hidden_states)
        return self.model.encode_image(pixels), None

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states: bool = False):
        self._no_hidden_states(hidden_states)
        return self.model.encode_text(input_ids), None

    def record(self) -> dict:
        return {"source": "open_clip", "name": self.name}


def keep_patch_tokens(tokens: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """MAE's per-sample random masking of (N, 1 + L, D) tokens (class token first, position embeddings already
    added): the class token and ``int(L * (1 - ratio))`` patch tokens per image, those with the smallest of N x L
    uniform draws (a CPU generator seeded with `seed`), in that order (CLIP-KD's ``random_masking``)."""
    cls, patches = tokens[:, :1], tokens[:, 1:]
    count, length, width = patches.shape
    keep = int(length * (1 - ratio))
    noise = torch.rand(count, length, generator=torch.Generator().manual_seed(seed)).to(tokens.device)
    kept = noise.argsort(dim=1)[:, :keep]
    return torch.cat([cls, patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))], dim=1)


@contextlib.contextmanager
def masked_image_patches(encoder: "DualEncoder", ratio: float, seed: int) -> Iterator[None]:
    """Inside, `encoder`'s image tower sees only the tokens `keep_patch_tokens` keeps (a transformers CLIP vision
    tower: the embeddings' output is cut before the pre-norm and the encoder, as CLIP-KD's ``mask_forward``)."""
    backbone = encoder.backbone
    if not isinstance(backbone, TransformersBackbone):
        raise ConfigError("masked image patches: need a transformers CLIP image tower (model.source config or "
                          "transformers)")
    handle = backbone.model.vision_model.embeddings.register_forward_hook(
        lambda module, args, output: keep_patch_tokens(output, ratio, seed))
    try:
        yield
    finally:
        handle.remove()


class DualEncoder(nn.Module):
    """An image tower and a text tower in one embedding space (`encode_image`, `encode_text`: unnormalised
    projections), CLIP's learnable log logit scale (`logit_scale`), and `forward` giving `ClipOutputs`."""

    def __init__(self, backbone: nn.Module, adapter: ImageAdapter):
        super().__init__()
        self.backbone, self.adapter = backbone, adapter

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def logit_scale(self) -> nn.Parameter:
        """log(1 / temperature), learnable (CLIP clamps it to [0, ln 100] after each update)."""
        return self.backbone.logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(self.adapter(images))[0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(input_ids, attention_mask)[0]

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                hidden_states: bool = False) -> ClipOutputs:
        image, image_hidden = self.backbone.encode_image(self.adapter(images), hidden_states)
        text, text_hidden = self.backbone.encode_text(input_ids, attention_mask, hidden_states)
        return ClipOutputs(F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1),
                           self.logit_scale.float().exp(), image_hidden, text_hidden, image, text)

    def record(self) -> dict:
        return {"backbone": self.backbone.record(), "adapter": self.adapter.record()}


# ---------------------------------------------------------------- building


def _clip_config(cfg: ClipModelConfig, image_size: int, channels: int, tokens: Any) -> Any:
    """transformers' CLIPConfig of `cfg`'s towers for images of `image_size` x `channels` and `tokens` (a
    tokenizer: its vocabulary, end id and length)."""
    transformers = require_transformers()
    vision, text = cfg.vision, cfg.text
    if image_size % vision.patch_size:
        raise ConfigError(f"model.vision.patch_size {vision.patch_size} does not divide the image size {image_size} "
                          "(set model.vision.image_size)")
    vocab = text.vocab_size or tokens.vocab_size
    if vocab < tokens.vocab_size:
        raise ConfigError(f"model.text.vocab_size {vocab} is below the tokenizer's {tokens.vocab_size} ids")
    eos = getattr(tokens, "eos_id", None)
    if eos is None:
        raise ConfigError("model.tokenizer: the tokenizer has no end-of-text token, which the text tower pools at")
    pad = getattr(tokens, "pad_id", None)
    pad = pad if pad is not None else getattr(getattr(tokens, "tokenizer", None), "pad_token_id", 0) or 0
    bos = getattr(tokens, "bos_id", None)
    bos = bos if bos is not None else getattr(getattr(tokens, "tokenizer", None), "bos_token_id", eos)
    return transformers.CLIPConfig(
        text_config=dict(hidden_size=text.hidden_size, num_hidden_layers=text.layers, num_attention_heads=text.heads,
                         intermediate_size=text.intermediate_size or 4 * text.hidden_size, vocab_size=vocab,
                         max_position_embeddings=tokens.max_length, pad_token_id=pad, bos_token_id=bos,
                         eos_token_id=eos),
        vision_config=dict(hidden_size=vision.hidden_size, num_hidden_layers=vision.layers,
                           num_attention_heads=vision.heads,
                           intermediate_size=vision.intermediate_size or 4 * vision.hidden_size,
                           image_size=image_size, patch_size=vision.patch_size, num_channels=channels),
        projection_dim=cfg.projection_dim, logit_scale_init_value=cfg.logit_scale_init)


def _pretrained_transformers(path: str) -> nn.Module:
    transformers = require_transformers()
    if not Path(path).is_dir():
        raise ConfigError(f"model.path {path}: no such folder (a transformers CLIPModel folder)")
    try:
        with quiet_progress():
            return transformers.CLIPModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.path {path}: not a transformers CLIPModel folder ({first})") from None


def _open_clip_model(name: str, pretrained: Optional[str]) -> nn.Module:
    open_clip = require_open_clip()
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except (RuntimeError, ValueError, OSError) as err:
        raise ConfigError(f"model.name {name} (pretrained {pretrained}): open_clip cannot build it ({err})") from None


def build_tokenizer(cfg: ClipModelConfig, captions: Sequence[str], max_length: int) -> Any:
    """The tokenizer `cfg` names (see `ClipModelConfig.tokenizer`); `captions` build a word vocabulary,
    `max_length` the length captions are padded to."""
    choice = cfg.tokenizer
    if cfg.source == "open_clip":
        if choice is not None:
            raise ConfigError("model.tokenizer: an open_clip model uses open_clip's tokenizer; leave it unset")
        return OpenClipTokenizer(cfg.name)
    if choice == WORDS or (choice is None and cfg.source == "config"):
        if cfg.source != "config":
            raise ConfigError("model.tokenizer: a word vocabulary only suits a text tower trained here "
                              "(model.source config)")
        return WordTokenizer.from_captions(captions, max_length)
    return FolderTokenizer(choice or cfg.path, max_length)


def build_encoder(cfg: ClipModelConfig, geometry: ImageGeometry, captions: Sequence[str]) -> tuple[DualEncoder, Any]:
    """(dual encoder, tokenizer) for `cfg` on images of `geometry`; random weights (drawn from the global
    generator: seed it first) for ``source: config``, the pretrained ones otherwise."""
    if cfg.source == "config":
        tokenizer = build_tokenizer(cfg, captions, cfg.text.max_length)
        image_size = cfg.vision.image_size or geometry.size
        channels = geometry.channels if cfg.pixel_mean is None else len(cfg.pixel_mean)
        transformers = require_transformers()
        backbone = TransformersBackbone(transformers.CLIPModel(_clip_config(cfg, image_size, channels, tokenizer)))
    elif cfg.source == "transformers":
        backbone = TransformersBackbone(_pretrained_transformers(cfg.path))
        tokenizer = build_tokenizer(cfg, captions, backbone.text_length)
    else:
        backbone = OpenClipBackbone(_open_clip_model(cfg.name, cfg.pretrained), cfg.name)
        tokenizer = build_tokenizer(cfg, captions, 0)
    adapter = ImageAdapter.between(geometry, backbone.image_size, backbone.in_channels, cfg)
    return DualEncoder(backbone, adapter), tokenizer


# ---------------------------------------------------------------- run folders


def save_encoder(run_dir: Path, encoder: DualEncoder, tokenizer: Any) -> None:
    """``model.safetensors``, ``encoder.json`` and the tokenizer into `run_dir`."""
    run_dir = Path(run_dir)
    export_weights(run_dir / WEIGHTS_FILE, encoder, {"task": "clip", "embed_dim": encoder.embed_dim})
    tokenizer.save(run_dir)
    text = json.dumps({**encoder.record(), "tokenizer": tokenizer.record()}, indent=1)
    atomic_write(run_dir / ENCODER_FILE, lambda tmp: tmp.write_text(text))


def _backbone_from_record(record: dict, where: Path) -> nn.Module:
    if record.get("source") == "transformers":
        transformers = require_transformers()
        config = transformers.CLIPConfig.from_dict(record["clip_config"])
        # a TinyCLIP-pruned model's layers differ in heads and MLP width, which CLIPModel(config) cannot build
        return TransformersBackbone(compact_skeleton(transformers.CLIPModel, config))
    if record.get("source") == "open_clip":
        return OpenClipBackbone(_open_clip_model(record["name"], None), record["name"])
    raise CheckpointError(f"{where}: unknown backbone {record.get('source')!r}")


def _tokenizer_from_record(record: dict, run_dir: Path) -> Any:
    kind = record.get("kind")
    if kind == WORDS:
        return WordTokenizer.load(run_dir / WORDS_FILE)
    if kind == FolderTokenizer.kind:
        return FolderTokenizer(run_dir / TOKENIZER_DIR, int(record["max_length"]))
    if kind == OpenClipTokenizer.kind:
        return OpenClipTokenizer(record["name"])
    raise CheckpointError(f"{run_dir / ENCODER_FILE}: unknown tokenizer {kind!r}")


def load_encoder(run_dir: str | Path) -> tuple[DualEncoder, Any]:
    """(dual encoder with its trained weights, tokenizer) of a kdzoo clip run folder."""
    run_dir = Path(run_dir)
    path = run_dir / ENCODER_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a finished kdzoo clip run (no {ENCODER_FILE})")
    try:
        record = json.loads(path.read_text())
        adapter = ImageAdapter(**record["adapter"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    encoder = DualEncoder(_backbone_from_record(record["backbone"], path), adapter)
    tensors, _ = read_weights(run_dir / WEIGHTS_FILE)
    bad = next((name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
               None)
    if bad is not None:
        raise CheckpointError(f"{run_dir / WEIGHTS_FILE}: weights that are not finite (NaN or inf), first in {bad}")
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{run_dir / WEIGHTS_FILE}: does not fit {ENCODER_FILE}'s model ({err})") from None
    return encoder.eval(), _tokenizer_from_record(record["tokenizer"], run_dir)


__all__ = ["ClipOutputs", "DualEncoder", "ImageAdapter", "ImageGeometry", "TransformersBackbone", "OpenClipBackbone",
           "WordTokenizer", "FolderTokenizer", "OpenClipTokenizer", "split_words", "build_tokenizer", "build_encoder",
           "save_encoder", "load_encoder", "require_transformers", "require_open_clip", "keep_patch_tokens",
           "masked_image_patches", "ENCODER_FILE", "WEIGHTS_FILE"]
