"""How good generated images are, measured in the feature space of a classifier kdzoo trained on the same data.

Inception weights are not available offline, and an ImageNet network says little about 16x16 digits anyway, so
the features are the penultimate layer (the input of the final ``nn.Linear``) of a classifier trained with
kdzoo's own classification training (`train_feature_classifier`, cached by what defines it).  In that space:

* FID (Heusel et al. 2017) and KID (Binkowski et al. 2018), computed by torchmetrics'
  ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` (``feature=`` a module);
* precision and recall (Kynkaanniemi et al. 2019): the share of generated samples inside the real k-NN manifold
  (the union of balls around each real sample reaching its k-th nearest real neighbour), and the share of real
  samples inside the generated one.

Images enter in [-1, 1] (the diffusion model's range); `ClassifierFeatures` maps them back to the classifier's
input normalisation (`ImageRange.to_data`).  torchmetrics comes with the ``[diffusion]`` extra.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...config import DataConfig, ModelConfig, TeacherConfig, TrainConfig, save_config
from ...data import build_dataset
from ...data.loaders import TensorData
from ...distiller import Distiller
from ...engine.rundir import RUN_CONFIG
from ...engine.runtime import atomic_write, resolve_device, seed_everything
from ...errors import CheckpointError, ConfigError
from ...models import create_model
from ...models.weights import load_weights
from ...taps import Taps, discover_layout
from ..classification import FitOptions, fit
from .models import ImageRange

CLASSIFIER_RECORD = "feature_classifier.json"  # written last: a folder holding it is a finished classifier
CLASSIFIER_WEIGHTS = "model.safetensors"
# training recipe of the feature classifier (kdzoo demo's: SGD, cosine, batch 64); only `epochs` and `seed` vary
CLASSIFIER_RECIPE = TrainConfig(epochs=1, batch_size=64, lr=0.05, schedule="cosine", weight_decay=5e-4,
                                save_every=10_000, progress=False)
DISTANCE_BLOCK_ELEMENTS = 1 << 24  # entries of one block of pairwise distances (128 MiB in float64)


def torchmetrics_classes() -> tuple[type, type]:
    """torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance), or a ConfigError naming the extra.
    Imported from their modules: ``torchmetrics.image`` lists them only when torch-fidelity (Inception's weights)
    is installed, which a custom ``feature=`` module does not need."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise ConfigError("FID/KID need torchmetrics: pip install 'kdzoo[diffusion]'") from None
    return FrechetInceptionDistance, KernelInceptionDistance


# ---------------------------------------------------------------- the feature extractor


class ClassifierFeatures(nn.Module):
    """The penultimate features of a classifier for images in [-1, 1], as a frozen (N, D) float64 extractor.

    `normalize` maps [-1, 1] images to the classifier's input normalisation (``ImageRange.to_data``);
    `image_shape`: (C, H, W) the classifier takes (used once to find the tap and `num_features`); `tap`: a
    `kdzoo.taps` tap, by default ``"penultimate"`` (the input of the last ``nn.Linear`` called).  The classifier
    stays in eval mode whatever `train()` says: a metric's features must not depend on the mode."""

    test_top1: Optional[float] = None  # the classifier's test top-1 (%), when `load_feature_classifier` knows it

    def __init__(self, classifier: nn.Module, normalize: Callable[[Tensor], Tensor],
                 image_shape: tuple[int, int, int], tap: str = "penultimate"):
        super().__init__()
        if len(image_shape) != 3:
            raise ConfigError(f"image_shape: expected (channels, height, width), got {tuple(image_shape)}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.normalize = normalize
        self.image_shape = tuple(int(s) for s in image_shape)
        device = _module_device(classifier)
        example = torch.zeros((2, *self.image_shape), device=device)
        self.tap = discover_layout(classifier, example).resolve(tap)
        self.num_features = int(self._tapped(example).shape[1])

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        super().train(mode)
        self.classifier.eval()
        return self

    def _tapped(self, inputs: Tensor) -> Tensor:
        with Taps(self.classifier, [self.tap]) as taps, torch.autocast(inputs.device.type, enabled=False):
            self.classifier(inputs.float())
            return taps.get(self.tap).flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, num_features) float64 features."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(f"images: expected (N, {', '.join(map(str, self.image_shape))}), "
                              f"got {tuple(images.shape)}")
        return self._tapped(self.normalize(images.float())).double()


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# ---------------------------------------------------------------- the classifier: trained once, cached


def classifier_key(dataset_name: str, dataset_options: dict, model_name: str, epochs: int, seed: int) -> str:
    """The cache folder's name: readable, plus a hash of everything that defines the classifier."""
    spec = json.dumps({"dataset": dataset_name, "options": dataset_options, "model": model_name,
                       "epochs": epochs, "seed": seed, "recipe": _recipe_fields()}, sort_keys=True, default=str)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    readable = f"{dataset_name}-{model_name}-e{epochs}-s{seed}".replace(":", "_").replace("/", "_")
    return f"{readable}-{digest}"


def _recipe_fields() -> dict:
    return {k: getattr(CLASSIFIER_RECIPE, k) for k in ("batch_size", "lr", "schedule", "weight_decay", "optimizer")}


def train_feature_classifier(dataset_name: str, dataset_options: Optional[dict], model_name: str, epochs: int,
                             seed: int, device: str = "auto", out_dir: str | Path = "runs/feature_classifiers",
                             verbose: bool = True) -> Path:
    """The folder of a classifier of `model_name` trained on the dataset for `epochs` with `seed` by kdzoo's
    classification training (what ``kdzoo teacher`` runs: `fit` on a plain `Distiller`), trained on the first
    call and reused by every later one with the same (dataset, options, model, epochs, seed).  Its test top-1
    (a feature space worth measuring FID in comes from a good classifier) is printed and kept in the folder."""
    options = dict(dataset_options or {})
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs: must be an integer >= 1, got {epochs!r}")
    folder = Path(out_dir) / classifier_key(dataset_name, options, model_name, epochs, seed)
    if (folder / CLASSIFIER_RECORD).is_file():
        if verbose:
            print(f"feature classifier: {describe_classifier(folder)} (cached in {folder})")
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted attempt left
    cfg = TeacherConfig(model=ModelConfig(model_name), data=DataConfig(dataset_name, options),
                        train=replace(CLASSIFIER_RECIPE, epochs=epochs, seed=seed, device=device),
                        output_dir=str(out_dir), name=folder.name)
    cfg.validate()
    try:
        _train_classifier(cfg, partial, verbose)
    except BaseException:  # a failed or interrupted training leaves nothing a later call could take for a result
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if (folder / CLASSIFIER_RECORD).is_file():  # another process finished the same classifier meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    if verbose:
        print(f"feature classifier: {describe_classifier(folder)} (trained into {folder})")
    return folder


def _train_classifier(cfg: TeacherConfig, run_dir: Path, verbose: bool) -> None:
    """`kdzoo teacher`'s run of `cfg` into `run_dir` (kdzoo.runner sits above the tasks, so its steps are spelled
    out here), then the record that `load_feature_classifier` reads: model, input shape, image range, top-1."""
    data = build_dataset(cfg.data.name, **cfg.data.options)
    if data.task != "classification":
        raise ConfigError(f"dataset {cfg.data.name!r} holds {data.task} labels; a feature classifier needs classes")
    seed_everything(cfg.train.seed)  # initial weights depend on the seed alone
    try:
        model = create_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels)
    except TypeError as err:
        raise ConfigError(f"model_name ({cfg.model.name}): {err}") from None
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / RUN_CONFIG)
    meta = {"model": cfg.model.name, "options": {}, "num_classes": data.num_classes,
            "in_channels": data.in_channels, "data": {"name": cfg.data.name, "options": cfg.data.options},
            "task": data.task}
    result = fit(Distiller(model), data, cfg.train, run_dir, verbose=verbose, options=FitOptions(export_meta=meta))
    (run_dir / "student.safetensors").replace(run_dir / CLASSIFIER_WEIGHTS)
    image_range = training_range(data.train)
    record = {"model": cfg.model.name, "num_classes": data.num_classes,
              "image_shape": [data.in_channels, *data.image_size], "image_range": {"low": image_range.low,
                                                                                   "high": image_range.high},
              "dataset": cfg.data.name, "dataset_options": cfg.data.options, "epochs": cfg.train.epochs,
              "seed": cfg.train.seed, "test_top1": result.last_top1}
    text = json.dumps(record, indent=2)
    atomic_write(run_dir / CLASSIFIER_RECORD, lambda tmp: tmp.write_text(text))


def training_range(split) -> ImageRange:
    """`ImageRange.of` the split's images (as the diffusion task computes it), read a chunk at a time."""
    if isinstance(split, TensorData):
        return ImageRange.of(split.images.float())
    low: Optional[Tensor] = None
    high: Optional[Tensor] = None
    for start in range(0, len(split), 1024):
        chunk = torch.stack([torch.as_tensor(split[i][0]) for i in range(start, min(start + 1024, len(split)))])
        flat = chunk.float().transpose(0, 1).flatten(1)
        low = flat.min(1).values if low is None else torch.minimum(low, flat.min(1).values)
        high = flat.max(1).values if high is None else torch.maximum(high, flat.max(1).values)
    if low is None:
        raise ConfigError("the dataset's training split is empty")
    return ImageRange(low.tolist(), high.tolist())


def read_classifier_record(path: str | Path) -> dict:
    """The record `train_feature_classifier` keeps beside the weights (model, image shape and range, top-1)."""
    found = Path(path) / CLASSIFIER_RECORD
    if not found.is_file():
        raise CheckpointError(f"{path}: not a feature classifier folder (no {CLASSIFIER_RECORD}; "
                              "make one with train_feature_classifier)")
    return json.loads(found.read_text())


def describe_classifier(path: str | Path) -> str:
    """``tiny:cnn on digits, 8 epochs: test top-1 97.56%``."""
    record = read_classifier_record(path)
    top1 = record.get("test_top1")
    score = f"{top1:.2f}%" if isinstance(top1, (int, float)) else "unknown"
    return f"{record['model']} on {record['dataset']}, {record['epochs']} epochs: test top-1 {score}"


def load_feature_classifier(path: str | Path, device: str = "auto",
                            normalize: Optional[Callable[[Tensor], Tensor]] = None) -> ClassifierFeatures:
    """The classifier of a `train_feature_classifier` folder as a `ClassifierFeatures` on `device`.  Its inputs
    are mapped from [-1, 1] with the training images' range; `normalize` replaces that mapping (a diffusion
    run's own ``image_range.json``: ``ImageRange(...).to_data``).  `.test_top1` is the classifier's test top-1."""
    record = read_classifier_record(path)
    shape = tuple(record["image_shape"])
    model = create_model(record["model"], num_classes=record["num_classes"], in_channels=shape[0])
    load_weights(model, Path(path) / CLASSIFIER_WEIGHTS, "feature classifier")
    model = model.to(resolve_device(device))
    normalize = normalize if normalize is not None else ImageRange(**record["image_range"]).to_data
    features = ClassifierFeatures(model, normalize, shape)
    features.test_top1 = record.get("test_top1")
    return features


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of FID's Inception-v3 (torch-fidelity's port of the TensorFlow graph, as
    torchmetrics uses it) for images in [-1, 1]: mapped to uint8 [0, 255], grey images repeated to RGB; the
    network resizes to 299 itself.  `network` takes (N, 3, H, W) uint8 and returns (N, 2048)."""

    num_features = 2048

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return self  # always eval: a metric's features must not depend on the mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] not in (1, 3):
            raise ConfigError(f"Inception features take grey or RGB images, got {images.shape[1]} channels")
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        return self.network(pixels).reshape(len(images), -1).double()


def load_inception_features(device: str = "cpu") -> InceptionFeatures:
    """FID's Inception-v3 through torchmetrics (needs torch-fidelity and its weights, downloaded on first use);
    a one-line ConfigError when either is missing, e.g. offline."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except (ImportError, ModuleNotFoundError, OSError, RuntimeError) as err:
        raise ConfigError(f"--features inception: FID's Inception-v3 is not available ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'}); it needs "
                          "pip install torch-fidelity and its weights (downloaded from GitHub on first use). "
                          "Use --features classifier offline") from None
    return InceptionFeatures(network).to(resolve_device(device))


# ---------------------------------------------------------------- the metrics


@torch.no_grad()
def extract_features(images: Tensor, features: nn.Module, batch_size: int = 256) -> Tensor:
    """(N, D) features of `images` (N, C, H, W) in [-1, 1], `batch_size` images at a time on the extractor's
    device (the images may stay on the CPU)."""
    if images.dim() != 4:
        raise ConfigError(f"images: expected (N, C, H, W), got {tuple(images.shape)}")
    device = _module_device(features)
    chunks = [features(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, getattr(features, "num_features", 0), device=device)


class GivenFeatures(nn.Module):
    """The identity, for torchmetrics' ``feature=``: the features are extracted once (`extract_features`) and fed
    to FID, KID and precision/recall alike, instead of running the classifier once per metric."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(real: Tensor, fake: Tensor, batch_size: int = 4096) -> float:
    """FID between two (N, D) feature sets: torchmetrics' FrechetInceptionDistance (float64 sums, unbiased
    covariances), fed `batch_size` rows at a time."""
    metric = torchmetrics_classes()[0](feature=GivenFeatures(real.shape[1]))
    metric = metric.to(real.device)
    for rows, is_real in ((real, True), (fake, False)):
        for i in range(0, len(rows), batch_size):
            metric.update(rows[i:i + batch_size].double(), real=is_real)
    return float(metric.compute())


def kernel_distance(real: Tensor, fake: Tensor, subset_size: int = 1000, subsets: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID over `subsets` random subsets of `subset_size` (cut to the smaller set's size) by
    torchmetrics' KernelInceptionDistance (cubic polynomial kernel, unbiased MMD^2); the subsets are drawn
    from `seed`, so a call is repeatable."""
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # that it keeps every feature (here, already in memory)
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = torchmetrics_classes()[1](feature=GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    metric = metric.to(real.device)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global CPU generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def knn_radii(features: Tensor, nearest_k: int = 3) -> Tensor:
    """(N,) distance from each row to its `nearest_k`-th nearest other row, in blocks of rows."""
    n = len(features)
    rows = max(1, DISTANCE_BLOCK_ELEMENTS // max(n, 1))
    radii = [torch.cdist(features[i:i + rows], features).kthvalue(nearest_k + 1, dim=1).values  # +1: itself
             for i in range(0, n, rows)]
    return torch.cat(radii)


def manifold_coverage(queries: Tensor, manifold: Tensor, radii: Tensor) -> float:
    """The share of `queries` within radii[j] of some manifold row j (distance <= radius), in blocks of rows."""
    rows = max(1, DISTANCE_BLOCK_ELEMENTS // max(len(manifold), 1))
    inside = 0
    for i in range(0, len(queries), rows):
        inside += int((torch.cdist(queries[i:i + rows], manifold) <= radii[None]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real: Tensor, fake: Tensor, nearest_k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the share of `fake` rows inside
    the real k-NN manifold, recall the share of `real` rows inside the fake one."""
    for name, rows in (("real", real), ("fake", fake)):
        if len(rows) <= nearest_k:
            raise ConfigError(f"{name}: {len(rows)} samples; precision/recall with nearest_k={nearest_k} needs "
                              f"at least {nearest_k + 1}")
    real, fake = real.double(), fake.double()
    precision = manifold_coverage(fake, real, knn_radii(real, nearest_k))
    recall = manifold_coverage(real, fake, knn_radii(fake, nearest_k))
    return precision, recall


def feature_metrics(real: Tensor, fake: Tensor, kid_subset: int = 1000, kid_subsets: int = 100,
                    nearest_k: int = 3, seed: int = 0) -> dict[str, float]:
    """FID, KID (mean, std), precision and recall of two (N, D) feature sets (real features can be extracted
    once and reused for every model evaluated against them)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(f"features: expected (N, D) real and fake with one D, got {tuple(real.shape)} and "
                          f"{tuple(fake.shape)}")
    for name, rows in (("real", real), ("fake", fake)):
        if len(rows) < 2:
            raise ConfigError(f"{name}: {len(rows)} samples; FID and KID need at least 2")
    fake = fake.to(real.device)
    kid_mean, kid_std = kernel_distance(real, fake, kid_subset, kid_subsets, seed)
    precision, recall = precision_recall(real, fake, nearest_k)
    return {"fid": frechet_distance(real, fake), "kid_mean": kid_mean, "kid_std": kid_std,
            "precision": precision, "recall": recall}


def image_metrics(real: Tensor, fake: Tensor, features: nn.Module, kid_subset: int = 1000, kid_subsets: int = 100,
                  nearest_k: int = 3, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """FID, KID mean and std, precision and recall of generated images `fake` against `real`, both (N, C, H, W)
    in [-1, 1], in the space of `features` (a `ClassifierFeatures`), `batch_size` images at a time."""
    for name, images in (("real", real), ("fake", fake)):
        if images.dim() != 4:
            raise ConfigError(f"{name}: expected images (N, C, H, W), got {tuple(images.shape)}")
    return feature_metrics(extract_features(real, features, batch_size), extract_features(fake, features, batch_size),
                           kid_subset, kid_subsets, nearest_k, seed)


__all__ = ["ClassifierFeatures", "InceptionFeatures", "load_inception_features", "train_feature_classifier", "load_feature_classifier", "read_classifier_record",
           "describe_classifier", "classifier_key", "training_range", "extract_features", "GivenFeatures",
           "frechet_distance", "kernel_distance", "knn_radii", "manifold_coverage", "precision_recall",
           "feature_metrics", "image_metrics", "torchmetrics_classes", "CLASSIFIER_RECORD", "CLASSIFIER_RECIPE"]
