"""``kdzoo clip`` configs: plain YAML mapped onto these dataclasses by `kdzoo.config.from_dict`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ...config import MethodConfig
from ...errors import ConfigError
from ...registry import CLIP_METHODS

SOURCES = ("config", "transformers", "open_clip")
WORDS = "words"  # model.tokenizer: a word vocabulary built from the captions, saved with the run
LN_100 = 4.605170185988092  # CLIP clamps its log logit scale to [0, ln 100]

# CLIP's 18 prompt templates for CIFAR-10 and CIFAR-100 (openai/CLIP, data/prompts.md); the first is also its
# plain "a photo of a {}." prompt
CLIP_CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _at_least(where: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{where}: must be >= {low:g}, got {value}")


@dataclass
class VisionTowerConfig:
    """A ViT image tower (transformers' CLIPVisionConfig fields)."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    patch_size: int = 4
    image_size: int = 0  # 0: the data's image size; otherwise images are resized to it
    intermediate_size: int = 0  # 0: 4 x hidden_size

    def validate(self, where: str) -> None:
        for key in ("hidden_size", "layers", "heads", "patch_size"):
            _at_least(f"{where}.{key}", getattr(self, key), 1)
        for key in ("image_size", "intermediate_size"):
            _at_least(f"{where}.{key}", getattr(self, key), 0)
        if self.hidden_size % self.heads:
            raise ConfigError(f"{where}.hidden_size {self.hidden_size} does not split into {self.heads} heads")
        if self.image_size and self.image_size % self.patch_size:
            raise ConfigError(f"{where}.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclass
class TextTowerConfig:
    """A causal Transformer text tower (transformers' CLIPTextConfig fields)."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    vocab_size: int = 0  # 0: the tokenizer's
    max_length: int = 16  # positions: captions are cut to this many tokens, start and end tokens included
    intermediate_size: int = 0  # 0: 4 x hidden_size

    def validate(self, where: str) -> None:
        for key in ("hidden_size", "layers", "heads"):
            _at_least(f"{where}.{key}", getattr(self, key), 1)
        _at_least(f"{where}.max_length", self.max_length, 3)
        for key in ("vocab_size", "intermediate_size"):
            _at_least(f"{where}.{key}", getattr(self, key), 0)
        if self.hidden_size % self.heads:
            raise ConfigError(f"{where}.hidden_size {self.hidden_size} does not split into {self.heads} heads")


@dataclass
class ClipModelConfig:
    """A dual encoder: a transformers CLIPModel built from `vision`/`text`/`projection_dim` (source config) or
    read from a folder (source transformers, `path`), or an open_clip model (source open_clip, `name` and
    `pretrained`; needs ``pip install 'kdzoo[clip]'``)."""

    source: str = "config"  # config | transformers | open_clip
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    projection_dim: int = 64
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), CLIP's initial temperature
    path: Optional[str] = None  # source transformers: a folder holding a CLIPModel (config.json and weights)
    name: Optional[str] = None  # source open_clip: the architecture, e.g. ViT-B-32
    pretrained: Optional[str] = None  # source open_clip: a pretrained tag or a checkpoint file (None: random)
    # None: a word vocabulary from the captions (source config), the model folder's tokenizer (transformers),
    # open_clip's own (open_clip); "words": the word vocabulary; anything else: a Hugging Face tokenizer folder
    tokenizer: Optional[str] = None
    # the input normalisation the model was trained with (a pretrained model: CLIP's own); images are mapped from
    # the dataset's normalisation to it.  None: the model takes the dataset's normalisation as it is
    pixel_mean: Optional[list[float]] = None
    pixel_std: Optional[list[float]] = None

    def validate(self, where: str = "model") -> None:
        _choice(f"{where}.source", self.source, SOURCES)
        if self.source == "config":
            self.vision.validate(f"{where}.vision")
            self.text.validate(f"{where}.text")
            _at_least(f"{where}.projection_dim", self.projection_dim, 1)
        if self.source == "transformers" and not self.path:
            raise ConfigError(f"{where}.path: source transformers reads a CLIPModel folder; name it")
        if self.source == "open_clip" and not self.name:
            raise ConfigError(f"{where}.name: source open_clip needs a model name (e.g. ViT-B-32)")
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ConfigError(f"{where}.pixel_mean and {where}.pixel_std: set both or neither")
        if self.pixel_std is not None and (len(self.pixel_std) != len(self.pixel_mean)
                                           or any(s <= 0 for s in self.pixel_std)):
            raise ConfigError(f"{where}.pixel_std: positive values, one per entry of pixel_mean")


@dataclass
class ClipDataConfig:
    """Image-caption pairs: a labelled kdzoo dataset captioned through class-name templates (`dataset`), or
    captioned images (`pairs`: a folder of images with same-name .txt files, or a .csv / .jsonl file)."""

    dataset: Optional[str] = None  # a labelled kdzoo dataset (kdzoo methods --datasets): digits, cifar10, ...
    options: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)  # empty: the dataset's own names
    templates: list[str] = field(default_factory=lambda: list(CLIP_CIFAR_TEMPLATES))  # "{}" takes the class name
    pairs: Optional[str] = None  # a folder of images + .txt captions, or a .csv / .jsonl file of pairs
    image_key: str = "image"  # .csv / .jsonl: the column of image paths (relative to the file's folder)
    caption_key: str = "caption"  # .csv / .jsonl: the column of captions
    image_size: int = 32  # pairs: images are decoded to this size
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])  # pairs: CLIP's
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    test_fraction: float = 0.1  # pairs: images held out for retrieval
    split_seed: int = 0  # pairs: which images are held out

    def validate(self) -> None:
        if (self.dataset is None) == (self.pairs is None):
            raise ConfigError("data: set data.dataset (a labelled kdzoo dataset) or data.pairs (captioned images), "
                              "one of them")
        if self.dataset is not None:
            if not self.templates:
                raise ConfigError("data.templates: at least one caption template is needed")
            bad = [t for t in self.templates if t.count("{}") != 1]
            if bad:
                raise ConfigError(f"data.templates: each template takes the class name once as {{}}, not {bad[0]!r}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction: must be between 0 and 1, got {self.test_fraction}")
        _at_least("data.image_size", self.image_size, 1)
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ConfigError("data.mean / data.std: three values each (RGB), std positive")


@dataclass
class ClipTrainConfig:
    epochs: int = 10
    batch_size: int = 128  # image-caption pairs per step: the negatives of the contrastive loss
    lr: float = 5e-4
    weight_decay: float = 0.2  # on matrices only (CLIP's: gains, biases and the logit scale get none)
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant (after the warm-up)
    max_grad_norm: float = 0.0  # 0: no clipping
    eval_every: int = 1  # epochs between evaluations
    save_every_steps: int = 0  # checkpoints inside an epoch too (0: at each epoch's end)
    eval_batch_size: int = 256
    retrieval_pairs: int = 1000  # held-out image-caption pairs of the retrieval recall (0: all)
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    progress: bool = True
    log_every: int = 20

    def validate(self) -> None:
        _choice("train.amp", self.amp, ("auto", "bf16", "off"))
        _choice("train.schedule", self.schedule, ("cosine", "constant"))
        for key in ("epochs", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        if self.batch_size < 2:
            raise ConfigError(f"train.batch_size: a contrastive batch needs >= 2 pairs, got {self.batch_size}")
        for key in ("lr", "weight_decay", "warmup_steps", "max_grad_norm", "save_every_steps", "retrieval_pairs"):
            _at_least(f"train.{key}", getattr(self, key), 0)


@dataclass
class ClipRunConfig:
    """A dual encoder trained contrastively from its initial weights (``kdzoo clip teacher``)."""

    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    output_dir: str = "runs/clip"
    name: Optional[str] = None

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()


INHERIT_KINDS = ("none", "manual", "auto")
INHERIT_LAYER_RULES = ("interval_front", "front")
INHERIT_PRUNING_TYPES = ("hidden", "heads", "intermediate", "layer")


@dataclass
class StudentInitConfig:
    """Where a distilled student's weights start: TinyCLIP's weight inheritance (Wu et al. ICCV 2023; the
    `kdzoo.tasks.clip.methods.tinyclip` module says what follows the authors).  `inherit`: none (the student of
    `model`, a copy of the teacher when `model` is unset, or `run`'s dual encoder as it is), manual (`model`'s tower
    sizes, weights sliced from the teacher or `run`), auto (the mask stage: the teacher's or `run`'s architecture under
    learnable hard-concrete gates for `prune_step` steps, the run's length, exported as the compact pruned model)."""

    inherit: str = "none"  # none | manual | auto
    run: Optional[str] = None  # a kdzoo clip run folder the student's weights come from (None: the teacher)
    rule: str = "interval_front"  # manual: teacher layer i * (T // S) for student layer i (front: the first S)
    target_sparsity: float = 0.25  # auto: of the attention + MLP weights (--target-sparsity)
    start_sparsity: float = 0.0  # auto: the target rises linearly from it (--start-sparsity)
    sparsity_warmup: int = 1000  # auto: over these steps (--sparsity-warmup)
    prune_step: int = 3000  # auto: mask-learning steps (--prune-step): the run's length, train.epochs unused
    pruning_types: list[str] = field(default_factory=lambda: ["hidden", "heads", "intermediate"])
    joint_sparsity: bool = True  # auto: one sparsity over both towers (--total-loss-flag)
    mask_lr: float = 0.02  # auto: the gates' log-alphas, a constant rate (optimizer.py)
    lambda_lr: float = -0.02  # auto: the Lagrange multipliers, negative: gradient ascent (--l0lr)

    def validate(self, model: Optional[ClipModelConfig]) -> None:
        _choice("student_init.inherit", self.inherit, INHERIT_KINDS)
        _choice("student_init.rule", self.rule, INHERIT_LAYER_RULES)
        if self.inherit == "manual" and (model is None or model.source != "config"):
            raise ConfigError("student_init.inherit manual: set model (source config) to the student's tower sizes")
        if self.inherit != "manual" and model is not None and (self.inherit == "auto" or self.run is not None):
            raise ConfigError(f"model: the student is {'the gated' if self.inherit == 'auto' else 'the'} model of "
                              f"{self.run or 'the teacher'}; leave model unset (student_init.inherit "
                              f"{self.inherit})")
        if self.inherit != "auto":
            return
        for key in ("start_sparsity", "target_sparsity"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"student_init.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.start_sparsity > self.target_sparsity:
            raise ConfigError(f"student_init.start_sparsity {self.start_sparsity} is above target_sparsity "
                              f"{self.target_sparsity}")
        _at_least("student_init.prune_step", self.prune_step, 1)
        _at_least("student_init.sparsity_warmup", self.sparsity_warmup, 0)
        bad = [t for t in self.pruning_types if t not in INHERIT_PRUNING_TYPES]
        if bad or not {"heads", "intermediate"} <= set(self.pruning_types):
            raise ConfigError(f"student_init.pruning_types: heads and intermediate, and some of hidden, layer; got "
                              f"{self.pruning_types}")
        if not self.mask_lr > 0 or not self.lambda_lr <= 0:
            raise ConfigError(f"student_init.mask_lr must be > 0 and student_init.lambda_lr <= 0 (ascent), got "
                              f"{self.mask_lr} and {self.lambda_lr}")


@dataclass
class ClipDistillConfig:
    """A student dual encoder trained with a registered method against a frozen teacher (``kdzoo clip distill``):
    a kdzoo clip run folder (`teacher`, whose data is used unless `data` is set) or a pretrained model
    (`teacher_model`, with `data`)."""

    method: MethodConfig  # a registered CLIP method with options (kdzoo methods --clip)
    teacher: Optional[str] = None  # a kdzoo clip run directory
    teacher_model: Optional[ClipModelConfig] = None  # or a pretrained dual encoder (source transformers/open_clip)
    model: Optional[ClipModelConfig] = None  # the student; None: a copy of the teacher, weights included
    data: Optional[ClipDataConfig] = None  # None: the teacher run's data
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    student_init: StudentInitConfig = field(default_factory=StudentInitConfig)  # TinyCLIP's weight inheritance
    output_dir: str = "runs/clip"
    name: Optional[str] = None

    def validate(self) -> None:
        self.student_init.validate(self.model)
        if (self.teacher is None) == (self.teacher_model is None):
            raise ConfigError("teacher: name a kdzoo clip run directory (teacher) or a pretrained model "
                              "(teacher_model), one of them")
        if self.teacher_model is not None:
            self.teacher_model.validate("teacher_model")
            if self.data is None:
                raise ConfigError("data: a pretrained teacher_model brings no data; set data.dataset or data.pairs")
        if self.model is not None:
            self.model.validate()
        if self.data is not None:
            self.data.validate()
        self.train.validate()
        try:
            entry = CLIP_METHODS.get(self.method.name)
        except ConfigError as err:
            raise ConfigError(f"method.name: {err}") from None
        entry.check(self.method.options, "method", self.method.name)


__all__ = ["VisionTowerConfig", "TextTowerConfig", "ClipModelConfig", "ClipDataConfig", "ClipTrainConfig",
           "ClipRunConfig", "ClipDistillConfig", "StudentInitConfig", "INHERIT_KINDS", "CLIP_CIFAR_TEMPLATES",
           "SOURCES", "WORDS", "LN_100"]
