"""TinyCLIP's weight inheritance (Wu et al., ICCV 2023, "TinyCLIP: CLIP Distillation via Affinity Mimicking and
Weight Inheritance") on transformers' ``CLIPModel``: a small CLIP starts from a large one's weights.

* Manual inheritance, `inherit_manual`: a smaller CLIPModel (fewer layers, narrower hidden / MLP, fewer heads of
  the same width) takes its weights from the teacher.  Layers are picked "interval_front" (teacher layer
  ``i * (T // S)`` for student layer ``i``) and every tensor keeps its leading slice on every axis, so the kept
  heads are the leading heads and the kept channels the leading channels.
* Automatic inheritance: hard-concrete (L0) gates, learnt with the model, over every tower's hidden (embedding)
  channels, each layer's attention heads and MLP channels (and, optionally, whole attention / MLP blocks); an
  expected-sparsity target is reached through the Lagrangian ``lambda_1 * gap + lambda_2 * gap^2`` with
  ``gap = max(target - expected, 0)``.  `apply_gates` applies gates multiplicatively through forward hooks (the
  transformers modules stay as they are); `prune_by_masks` turns the model and its deterministic gates into the
  compact CLIPModel that the next training phase continues from.
* Progressive multi-stage shrinking: `TINYCLIP_AUTO_STAGES` (100% -> 75% -> 50% -> 25% of the prunable weights,
  i.e. target sparsity 0.25, 0.5, 0.75) and `TINYCLIP_MANUAL_STAGES`; `expand_for_next_stage` puts a compact model
  back into the full architecture with its removed units' gates closed, as the authors resume each stage.

Reference code read: github.com/wkcn/TinyCLIP (mirror HEAD ad981bf):
- src/open_clip/weight_inherit.py: ``weight_inherit`` (lines 71-138: "interval_front" depth mapping, lines 83-85;
  leading-head slicing of the stacked qkv, lines 101-117; ``prune_param``, leading slices of everything else,
  lines 54-61 and 119-131).
- src/open_clip/l0module.py (adapted by the authors from CoFiPruning): limits ``(-0.1, 1.1)`` and ``epsilon = 1e-6``
  (line 12), temperature 2/3 and ``magical_number = 0.8`` (lines 20-22), log-alpha init 10 (``default_mean``,
  lines 83-126; the ``init_loga = 0.5`` path of line 53 is never used), lambdas 10 (lines 69-70), clamping of the
  log-alphas to ``[ln 1e-2, ln 1e2]`` (lines 136-139), ``cdf_qz`` / ``score_loga`` (141-148), the expected number
  of parameters (150-202), the target warm-up (204-207), the one-sided Lagrangian (209-227), ``_sample_z``
  (230-238), ``_deterministic_z`` (241-254) and ``forward`` (313-333).
- src/open_clip/model.py: where the gates act in the forward (LayerNorm over the kept channels 40-68, MLP 121-137,
  attention 238-283, residual block 285-315, ViT 493-535, text 764-805), how they are folded into the compact
  weights (``prune`` methods, lines 70-83, 139-205, 317-339, 545-566, 820-844), the CLIP pruning types
  ``["hidden", "heads", "intermediate"]`` (lines 649, 731) and ``load_pruned_model`` (1299-1412: the next stage's
  full-size model, leading slots filled, removed units' log-alphas set to -10 and the lambdas back to 10).
- src/training/train.py (joint image + text Lagrangian under ``--total-loss-flag``, 256-311; fusing at
  ``--prune-step``, 333-384; log-alpha clamping after each step, 509-516), src/training/optimizer.py (log-alphas at
  lr 0.02, lambdas at ``--l0lr`` = -0.02, i.e. gradient ascent, weight decay 0; lines 71-99),
  src/training/params.py lines 315-361 (defaults), src/training/main.py 514-519 (the model's lr warms up over the
  ``prune_step`` mask steps; after fusing it decays by cosine, train.py 383-384; the gates' lr drops to 0,
  scheduler.py ``step_lr``), script/auto_weight_inherit_*.sh and script/manual_weight_inherit_*.sh (the stages),
  src/open_clip/model_configs/TinyCLIP-ViT-61M-32-Text-29M.json and -40M-32-Text-19M.json (manual targets).

Follows the authors: the gate formulas and constants above; the gates applied where their forward applies them
(embeddings x hidden gate; LayerNorm statistics over the channels whose hidden gate is not 0, nothing outside set;
each head's attention output x head gate before the output projection; attention and MLP outputs x hidden gate
x block gate; MLP hidden x channel gate); the parameter count of the sparsity (attention + MLP weights of the
blocks only, with their approximation under a hidden gate); the joint image + text sparsity of their scripts;
folding the deterministic gates' soft values into the kept weights.

OUR READING / differences:
- Their ``prune`` also scales the final projection's rows by the hidden gate although their forward does not
  multiply the last LayerNorm's output by it (model.py 530-533 vs 561-565, 795-799 vs 842-843); we keep the
  forward's function, so the compact model reproduces the gated model exactly.  Likewise a layer whose heads are
  all removed keeps its output projection's (gated) bias, which their forward adds and their ``prune`` drops.
- transformers' attention cannot run with zero heads: such a layer keeps one head whose weights are all 0 (its
  output is exactly the gated bias).  Per-layer head / MLP counts then differ, which a CLIPConfig cannot say: the
  compact model's tower configs hold ``num_attention_heads`` 1 (transformers wants ``hidden_size`` to split into
  it), the largest MLP width in ``intermediate_size`` and the per-layer counts in ``pruned_layer_heads`` /
  ``pruned_layer_intermediate`` / ``pruned_layer_sources`` (with ``pruned_head_dim``); `compact_skeleton` builds
  that shape again from the config, which ``CLIPModel(config)`` cannot.
  A layer whose attention and MLP block gates are both 0 is an identity and is dropped (the authors' CLIP runs
  never gate whole blocks).
- Manual inheritance across different patch sizes / sequence lengths keeps the leading slices as their
  ``prune_param`` does; the head width must stay the teacher's (their code fixes it to 64).
- Their open_clip towers fold q, k, v into one ``in_proj``; transformers keeps three projections, whose leading
  rows are the same leading heads.
- The training loop (distillation loss + `ClipHardConcreteGates.lagrangian_loss`, the two optimisers, fusing at
  ``prune_step``) is the method's; here are the pieces it calls.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError

__all__ = [
    "TINYCLIP_AUTO_STAGES", "TINYCLIP_MANUAL_STAGES", "AutoInheritOptions", "ClipHardConcreteGates", "ManualStage",
    "ShrinkStage", "TowerGates", "TowerHardConcreteGates", "TowerShape", "apply_gates", "compact_skeleton",
    "deterministic_gates", "expand_for_next_stage", "expected_remaining_parameters", "hard_concrete_keep_probability",
    "hard_concrete_sample", "inherit_manual", "inherited_layer_indices", "lagrangian_penalty",
    "progressive_sparsity_targets", "prunable_parameters", "prune_by_masks", "scheduled_target_sparsity",
    "shrink_config",
]

# ---------------------------------------------------------------- the authors' constants (l0module.py, optimizer.py)
STRETCH_LIMITS = (-0.1, 1.1)  # (gamma, zeta): the stretched concrete's interval, l0module.py:12
EPSILON = 1e-6  # l0module.py:12
TEMPERATURE = 2.0 / 3.0  # beta, l0module.py:20
MAGICAL_NUMBER = 0.8  # deterministic gate sigmoid(log_alpha / beta * 0.8), l0module.py:22 ("from Wang et al. 2020")
LOG_ALPHA_INIT = 10.0  # l0module.py:83 (default_mean), every gate starts open
LOG_ALPHA_CLOSED = -10.0  # model.py:1322,1368: a unit removed in an earlier stage starts closed
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # clamped after every step, l0module.py:136-139, train.py:509-516
LAMBDA_INIT = 10.0  # lambda_1, lambda_2, l0module.py:69-70 (reset to 10 at each stage, model.py:1362-1366)
GATE_LR = 0.02  # log-alphas, optimizer.py:72
LAMBDA_LR = -0.02  # lambdas, params.py:360 (--l0lr): a negative AdamW lr ascends the Lagrangian in them

PRUNING_TYPES = ("hidden", "heads", "intermediate", "layer")  # L0Module's default, l0module.py:21
CLIP_PRUNING_TYPES = ("hidden", "heads", "intermediate")  # what TinyCLIP's towers use, model.py:649,731
TOWERS = ("vision", "text")
LAYER_RULES = ("interval_front", "front")
# tower -> (encoder attribute, projection attribute, LayerNorms outside the layers)
_TOWER_PARTS = {"vision": ("vision_model", "visual_projection", ("pre_layrnorm", "post_layernorm")),
                "text": ("text_model", "text_projection", ("final_layer_norm",))}


# ---------------------------------------------------------------- gates


@dataclass
class TowerGates:
    """One tower's gate values (samples, deterministic masks, keep-probabilities or a 0/1 pattern); ``None`` = all 1.

    hidden: (D,) embedding channels, shared by every layer; heads: (L, H); intermediate: (L, I) MLP channels;
    attention_layers / mlp_layers: (L,) whole attention / MLP blocks (TinyCLIP's ``mha_z`` / ``ffn_z``)."""

    hidden: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    attention_layers: torch.Tensor | None = None
    mlp_layers: torch.Tensor | None = None


GATE_NAMES = tuple(f.name for f in fields(TowerGates))


@dataclass(frozen=True)
class TowerShape:
    """The sizes a tower's gates cover, read from a transformers CLIP{Vision,Text}Config."""

    hidden: int
    heads: int
    intermediate: int
    layers: int

    @classmethod
    def of(cls, tower_config) -> TowerShape:
        return cls(tower_config.hidden_size, tower_config.num_attention_heads, tower_config.intermediate_size,
                   tower_config.num_hidden_layers)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def gate_shape(self, name: str) -> tuple[int, ...]:
        return {"hidden": (self.hidden,), "heads": (self.layers, self.heads),
                "intermediate": (self.layers, self.intermediate), "attention_layers": (self.layers,),
                "mlp_layers": (self.layers,)}[name]


def hard_concrete_sample(log_alpha: torch.Tensor, uniform: torch.Tensor, temperature: float = TEMPERATURE,
                         limits: tuple[float, float] = STRETCH_LIMITS) -> torch.Tensor:
    """Hard-concrete gate from uniform noise ``u`` (Louizos et al. 2018; l0module.py ``_sample_z``, 230-238):
    ``z = min(1, max(0, sigmoid((log u - log(1 - u) + log_alpha) / beta) * (zeta - gamma) + gamma))``."""
    low, high = limits
    stretched = torch.sigmoid((torch.log(uniform) - torch.log(1 - uniform) + log_alpha) / temperature)
    return F.hardtanh(stretched * (high - low) + low, min_val=0.0, max_val=1.0)


def hard_concrete_keep_probability(log_alpha: torch.Tensor, temperature: float = TEMPERATURE,
                                   limits: tuple[float, float] = STRETCH_LIMITS,
                                   epsilon: float = EPSILON) -> torch.Tensor:
    """Expected L0 of one gate, ``P(z != 0) = 1 - Q(0)`` with the stretched concrete's CDF
    ``Q(0) = clamp(sigmoid(beta * log(-gamma / zeta) - log_alpha), eps, 1 - eps)`` (l0module.py ``cdf_qz`` /
    ``score_loga``, 141-148, written there as the CDF at ``(0 - gamma) / (zeta - gamma)``)."""
    low, high = limits
    position = (0.0 - low) / (high - low)
    logit = math.log(position) - math.log(1.0 - position)
    cdf_at_zero = torch.sigmoid(logit * temperature - log_alpha).clamp(min=epsilon, max=1 - epsilon)
    return 1.0 - cdf_at_zero


def deterministic_gates(log_alpha: torch.Tensor, temperature: float = TEMPERATURE,
                        magical_number: float = MAGICAL_NUMBER) -> torch.Tensor:
    """Evaluation gates, row by row over the last axis (l0module.py ``_deterministic_z`` with ``soft=True``, 241-254):
    ``sigmoid(log_alpha / beta * magical_number)``, with its ``round(n - sum P(z != 0))`` smallest values set to 0
    (Python's ``round``: halves go to the even integer)."""
    soft = torch.sigmoid(log_alpha / temperature * magical_number)
    expected_zeros = log_alpha.shape[-1] - hard_concrete_keep_probability(log_alpha, temperature).sum(-1)
    rows = soft.reshape(-1, soft.shape[-1]).clone()
    for row, zeros in zip(rows, expected_zeros.reshape(-1).tolist()):
        count = round(zeros)
        if count > 0:
            row[torch.topk(row, k=count, largest=False).indices] = 0.0
    return rows.reshape(soft.shape)


def prunable_parameters(shape: TowerShape) -> int:
    """The parameters the sparsity counts: every layer's attention (4 D^2 + 4 D) and MLP (2 D I + D + I) weights
    (l0module.py 40-51 and 92-103; embeddings, LayerNorms and projections are left out)."""
    per_head = (4 * shape.hidden * shape.hidden + 4 * shape.hidden) // shape.heads
    per_mlp = 2 * shape.hidden * shape.intermediate + shape.hidden + shape.intermediate
    return shape.layers * (shape.heads * per_head + per_mlp)


def expected_remaining_parameters(shape: TowerShape, keep: TowerGates) -> torch.Tensor:
    """Expected attention + MLP parameters under gates kept with the probabilities ``keep`` (l0module.py
    ``get_num_parameters_and_constraint``, 150-202).  With ``p_lh = P(head) P(attention block)`` and
    ``q_li = P(MLP channel) P(MLP block)``: without a hidden gate ``sum p * (4 D^2 + 4 D) // H + sum q *
    ((2 D I + D + I) // I)``; with one, ``sum_d sum_lh s_d p_lh * ((4 D^2 + 4 D) // H) / D + 2 sum_d sum_li s_d
    q_li`` (the outer products of their code, summed)."""
    per_head = (4 * shape.hidden * shape.hidden + 4 * shape.hidden) // shape.heads
    per_channel = (2 * shape.hidden * shape.intermediate + shape.hidden + shape.intermediate) // shape.intermediate
    reference = next(g for g in (keep.hidden, keep.heads, keep.intermediate, keep.attention_layers, keep.mlp_layers)
                     if g is not None)

    def ones(*size):
        return reference.new_ones(size)

    heads = keep.heads if keep.heads is not None else ones(shape.layers, shape.heads)
    attention = keep.attention_layers if keep.attention_layers is not None else ones(shape.layers)
    channels = keep.intermediate if keep.intermediate is not None else ones(shape.layers, shape.intermediate)
    mlp = keep.mlp_layers if keep.mlp_layers is not None else ones(shape.layers)
    head_mass = (heads * attention[:, None]).sum()
    channel_mass = (channels * mlp[:, None]).sum()
    if keep.hidden is None:
        return head_mass * per_head + channel_mass * per_channel
    hidden_mass = keep.hidden.sum()
    return hidden_mass * head_mass * per_head / shape.hidden + 2 * hidden_mass * channel_mass


def lagrangian_penalty(expected_sparsity: torch.Tensor, target_sparsity: float, lambda_1: torch.Tensor,
                       lambda_2: torch.Tensor) -> torch.Tensor:
    """``lambda_1 * max(t - s, 0) + lambda_2 * max(t - s, 0)^2`` for expected sparsity ``s`` and target ``t``
    (l0module.py ``lagrangian_regularization`` 209-227; train.py 278-287 with the towers' lambdas averaged)."""
    gap = torch.clamp(target_sparsity - expected_sparsity, min=0.0)
    return lambda_1 * gap + lambda_2 * gap.square()


def scheduled_target_sparsity(step: int, start: float, target: float, warmup: int) -> float:
    """The target at ``step``: linear from ``start`` to ``target`` over ``warmup`` steps, then ``target``
    (l0module.py ``get_target_sparsity`` 204-207; no warm-up when ``warmup <= 0``, 210-211)."""
    if warmup <= 0:
        return target
    return (target - start) * min(1.0, step / warmup) + start


# ---------------------------------------------------------------- learnable gates


@dataclass
class AutoInheritOptions:
    """One automatic-inheritance stage (params.py 315-361 defaults; every script sets ``total_loss_flag``)."""

    start_sparsity: float = 0.0  # --start-sparsity
    target_sparsity: float = 0.25  # --target-sparsity
    sparsity_warmup: int = 1000  # --sparsity-warmup: steps from start to target
    prune_step: int = 3000  # --prune-step: mask-learning steps, then the gates are fused (prune_by_masks)
    pruning_types: tuple[str, ...] = CLIP_PRUNING_TYPES
    joint_sparsity: bool = True  # --total-loss-flag: one sparsity over both towers' parameters
    towers: tuple[str, ...] = TOWERS  # --prune-image / --prune-text

    def validate(self) -> None:
        for name in ("start_sparsity", "target_sparsity"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"auto inheritance: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.start_sparsity > self.target_sparsity:
            raise ConfigError(f"auto inheritance: start_sparsity {self.start_sparsity} is above target_sparsity "
                              f"{self.target_sparsity}")
        for name in ("sparsity_warmup", "prune_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"auto inheritance: {name} must be >= 0, got {getattr(self, name)}")
        unknown = [t for t in self.pruning_types if t not in PRUNING_TYPES]
        if unknown or not {"heads", "intermediate"} <= set(self.pruning_types):
            raise ConfigError(f"auto inheritance: pruning_types must hold heads and intermediate, from "
                              f"{', '.join(PRUNING_TYPES)}; got {', '.join(self.pruning_types)}")
        if not self.towers or any(t not in TOWERS for t in self.towers):
            raise ConfigError(f"auto inheritance: towers must be some of {', '.join(TOWERS)}, got {self.towers}")
        if self.joint_sparsity and set(self.towers) != set(TOWERS):
            raise ConfigError("auto inheritance: joint_sparsity needs both towers gated (towers: vision, text)")


def _gate_names(pruning_types: tuple[str, ...]) -> tuple[str, ...]:
    names = [name for name in ("hidden", "heads", "intermediate") if name in pruning_types]
    return tuple(names + (["attention_layers", "mlp_layers"] if "layer" in pruning_types else []))


class TowerHardConcreteGates(nn.Module):
    """One tower's log-alphas (TinyCLIP's per-encoder ``L0Module``) and its multipliers ``lambda_1``, ``lambda_2``.

    ``kept`` (a 0/1 `TowerGates`, see `expand_for_next_stage`) starts the units it marks 0 closed (log-alpha -10),
    as the authors start a later stage."""

    def __init__(self, shape: TowerShape, pruning_types: tuple[str, ...] = CLIP_PRUNING_TYPES,
                 kept: TowerGates | None = None):
        super().__init__()
        self.shape = shape
        self.log_alpha = nn.ParameterDict()
        for name in _gate_names(pruning_types):
            initial = torch.full(shape.gate_shape(name), LOG_ALPHA_INIT)
            pattern = getattr(kept, name) if kept is not None else None
            if pattern is not None:
                initial = torch.where(pattern.detach().cpu() != 0, initial, torch.full_like(initial, LOG_ALPHA_CLOSED))
            self.log_alpha[name] = nn.Parameter(initial)
        self.lambda_1 = nn.Parameter(torch.tensor(LAMBDA_INIT))
        self.lambda_2 = nn.Parameter(torch.tensor(LAMBDA_INIT))

    def _gates(self, make) -> TowerGates:
        return TowerGates(**{name: make(name, alpha) for name, alpha in self.log_alpha.items()})

    def sample(self) -> TowerGates:
        """Training gates: one hard-concrete draw per unit (u ~ U(eps, 1 - eps), l0module.py 232)."""
        return self._gates(lambda name, alpha: hard_concrete_sample(
            alpha, torch.empty_like(alpha).uniform_(EPSILON, 1.0 - EPSILON)))

    def deterministic(self) -> TowerGates:
        """Evaluation gates (no gradient): the hidden gate over all channels at once, heads / MLP channels layer by
        layer, each block gate on its own (l0module.py 322-332)."""
        def make(name, alpha):
            if name in ("attention_layers", "mlp_layers"):
                return deterministic_gates(alpha.detach()[:, None])[:, 0]
            return deterministic_gates(alpha.detach())
        return self._gates(make)

    def keep_probabilities(self) -> TowerGates:
        return self._gates(lambda name, alpha: hard_concrete_keep_probability(alpha))

    def expected_remaining(self) -> torch.Tensor:
        return expected_remaining_parameters(self.shape, self.keep_probabilities())

    def prunable(self) -> int:
        return prunable_parameters(self.shape)

    def constrain_(self) -> None:
        """Clamp the log-alphas to ``[ln 1e-2, ln 1e2]``, as the authors do after every optimiser step."""
        with torch.no_grad():
            for alpha in self.log_alpha.values():
                alpha.clamp_(*LOG_ALPHA_RANGE)


class ClipHardConcreteGates(nn.Module):
    """Both towers' learnable gates for one automatic-inheritance stage of a CLIPModel (``config``: its CLIPConfig).

    ``forward()`` gives the gates of the current mode (a draw in training, the deterministic gates in eval), like
    their ``L0Module.forward``; use them with `apply_gates`, add `lagrangian_loss` to the distillation loss, step
    the optimiser built from `parameter_groups`, then `constrain_`.  After ``options.prune_step`` steps,
    ``prune_by_masks(model, gates.eval()())`` is the compact model."""

    def __init__(self, config, options: AutoInheritOptions | None = None,
                 kept: Mapping[str, TowerGates] | None = None):
        super().__init__()
        self.options = options if options is not None else AutoInheritOptions()
        self.options.validate()
        kept = kept or {}
        self.towers = nn.ModuleDict({
            tower: TowerHardConcreteGates(TowerShape.of(getattr(config, f"{tower}_config")),
                                          self.options.pruning_types, kept.get(tower))
            for tower in self.options.towers})

    def forward(self) -> dict[str, TowerGates]:
        return {name: (tower.sample() if self.training else tower.deterministic())
                for name, tower in self.towers.items()}

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """Per tower ``1 - expected / prunable``, and under ``"joint"`` the pooled one (train.py 263-271)."""
        remaining = {name: tower.expected_remaining() for name, tower in self.towers.items()}
        sparsity = {name: 1 - remaining[name] / tower.prunable() for name, tower in self.towers.items()}
        sparsity["joint"] = 1 - sum(remaining.values()) / sum(t.prunable() for t in self.towers.values())
        return sparsity

    def target_sparsity(self, step: int) -> float:
        o = self.options
        return scheduled_target_sparsity(step, o.start_sparsity, o.target_sparsity, o.sparsity_warmup)

    def lagrangian_loss(self, step: int) -> torch.Tensor:
        """Joint: one penalty on the pooled sparsity with the towers' mean lambdas (train.py 260-287); otherwise
        each tower's own penalty, summed (train.py 295-311)."""
        sparsity, target = self.expected_sparsity(), self.target_sparsity(step)
        towers = list(self.towers.values())
        if self.options.joint_sparsity:
            lambda_1 = sum(t.lambda_1 for t in towers) / len(towers)
            lambda_2 = sum(t.lambda_2 for t in towers) / len(towers)
            return lagrangian_penalty(sparsity["joint"], target, lambda_1, lambda_2)
        return sum(lagrangian_penalty(sparsity[name], target, tower.lambda_1, tower.lambda_2)
                   for name, tower in self.towers.items())

    def parameter_groups(self) -> list[dict]:
        """AdamW groups as the authors build them: log-alphas at lr 0.02, lambdas at lr -0.02, no weight decay."""
        alphas = [p for tower in self.towers.values() for p in tower.log_alpha.values()]
        lambdas = [p for tower in self.towers.values() for p in (tower.lambda_1, tower.lambda_2)]
        return [{"params": alphas, "lr": GATE_LR, "weight_decay": 0.0},
                {"params": lambdas, "lr": LAMBDA_LR, "weight_decay": 0.0}]

    def constrain_(self) -> None:
        for tower in self.towers.values():
            tower.constrain_()


# ---------------------------------------------------------------- gates in the forward (hooks)


def _tower_parts(model: nn.Module, tower: str):
    encoder_name, projection_name, outer_norms = _TOWER_PARTS[tower]
    encoder = getattr(model, encoder_name)
    return encoder, projection_name, [getattr(encoder, name) for name in outer_norms]


def _layer_gate(gate: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    return None if gate is None else gate[layer]


def _times(*gates: torch.Tensor | None) -> torch.Tensor | None:
    present = [g for g in gates if g is not None]
    if not present:
        return None
    product = present[0]
    for gate in present[1:]:
        product = product * gate
    return product


def _scale_output(gate: torch.Tensor):
    def hook(module, args, output):
        return output * gate.to(output.dtype)
    return hook


def _scale_input(gate: torch.Tensor):
    def hook(module, args):
        return (args[0] * gate.to(args[0].dtype),) + tuple(args[1:])
    return hook


def _norm_over_kept(kept: torch.Tensor):
    """LayerNorm statistics over the kept channels only, 0 elsewhere (their LayerNorm.forward, model.py 43-68)."""
    def hook(module, args, output):
        x = args[0]
        normed = F.layer_norm(x.index_select(-1, kept), (len(kept),), module.weight[kept], module.bias[kept],
                              module.eps)
        return x.new_zeros(x.shape).index_copy(-1, kept, normed)
    return hook


def _tower_hooks(model: nn.Module, tower: str, gates: TowerGates) -> Iterator:
    encoder, _, outer_norms = _tower_parts(model, tower)
    hidden = gates.hidden
    if hidden is not None:
        kept = torch.nonzero(hidden != 0).reshape(-1).to(hidden.device)
        yield encoder.embeddings.register_forward_hook(_scale_output(hidden))
        inner_norms = [norm for layer in encoder.encoder.layers for norm in (layer.layer_norm1, layer.layer_norm2)]
        for norm in outer_norms + inner_norms:
            yield norm.register_forward_hook(_norm_over_kept(kept))
    for index, layer in enumerate(encoder.encoder.layers):
        attention = layer.self_attn
        heads = _layer_gate(gates.heads, index)
        if heads is not None:
            per_channel = heads.repeat_interleave(attention.head_dim)
            yield attention.out_proj.register_forward_pre_hook(_scale_input(per_channel))
        attention_out = _times(hidden, _layer_gate(gates.attention_layers, index))
        if attention_out is not None:
            yield attention.out_proj.register_forward_hook(_scale_output(attention_out))
        channels = _layer_gate(gates.intermediate, index)
        if channels is not None:
            yield layer.mlp.fc2.register_forward_pre_hook(_scale_input(channels))
        mlp_out = _times(hidden, _layer_gate(gates.mlp_layers, index))
        if mlp_out is not None:
            yield layer.mlp.fc2.register_forward_hook(_scale_output(mlp_out))


@contextmanager
def apply_gates(model: nn.Module, gates: Mapping[str, TowerGates]):
    """Within the block, ``model`` (a transformers CLIPModel) runs with ``gates`` ({"vision"|"text": TowerGates})
    multiplied in where TinyCLIP's forward multiplies them; the hooks are removed on leaving the block."""
    _check_gates(model, gates)
    handles = []
    try:
        for tower, tower_gates in gates.items():
            handles.extend(_tower_hooks(model, tower, tower_gates))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _check_gates(model: nn.Module, gates: Mapping[str, TowerGates]) -> None:
    for tower, tower_gates in gates.items():
        if tower not in TOWERS:
            raise ConfigError(f"gates: unknown tower {tower!r} (vision, text)")
        tower_config = getattr(model.config, f"{tower}_config")
        if hasattr(tower_config, "pruned_layer_heads"):
            raise ConfigError(f"gates: the {tower} tower is a compact model with per-layer sizes; gate the full "
                              f"architecture from expand_for_next_stage instead")
        shape = replace(TowerShape.of(tower_config), layers=len(_tower_parts(model, tower)[0].encoder.layers))
        for name in GATE_NAMES:
            gate = getattr(tower_gates, name)
            if gate is not None and tuple(gate.shape) != shape.gate_shape(name):
                raise ConfigError(f"gates: {tower}.{name} has shape {tuple(gate.shape)}, the model needs "
                                  f"{shape.gate_shape(name)}")


# ---------------------------------------------------------------- compact model from the gates


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                               device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
    return layer


def _layer_norm(norm: nn.LayerNorm, kept: torch.Tensor) -> nn.LayerNorm:
    new = nn.utils.skip_init(nn.LayerNorm, len(kept), eps=norm.eps, device=norm.weight.device,
                             dtype=norm.weight.dtype)
    new.weight = nn.Parameter(norm.weight.detach()[kept].clone())
    new.bias = nn.Parameter(norm.bias.detach()[kept].clone())
    return new


def _embedding(weight: torch.Tensor) -> nn.Embedding:
    return nn.Embedding.from_pretrained(weight.detach().clone(), freeze=False)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def _prune_attention(attention: nn.Module, hidden: torch.Tensor, heads: torch.Tensor, block: torch.Tensor) -> int:
    """Fold the gates into one attention block; returns the heads kept (0: one all-zero head stands in)."""
    kept_hidden = torch.nonzero(hidden != 0).reshape(-1)
    head_dim = attention.head_dim
    kept_heads = torch.nonzero((heads != 0) & (block != 0)).reshape(-1)
    out = attention.out_proj
    out_scale = hidden * block
    out_bias = (out.bias.detach() * out_scale)[kept_hidden]
    if len(kept_heads):
        rows = _head_rows(kept_heads, head_dim)
        for name in ("q_proj", "k_proj", "v_proj"):
            projection = getattr(attention, name)
            setattr(attention, name, _linear(projection.weight.detach()[rows][:, kept_hidden],
                                             projection.bias.detach()[rows]))
        channel_gate = heads.repeat_interleave(head_dim)
        out_weight = (out.weight.detach() * out_scale[:, None] * channel_gate[None, :])[kept_hidden][:, rows]
    else:  # transformers' attention needs a head: a zero one leaves only the gated bias
        zeros = out.weight.new_zeros(head_dim, len(kept_hidden))
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attention, name, _linear(zeros, zeros.new_zeros(head_dim)))
        out_weight = out.weight.new_zeros(len(kept_hidden), head_dim)
    attention.out_proj = _linear(out_weight, out_bias)
    attention.num_heads = max(1, len(kept_heads))
    attention.embed_dim = len(kept_hidden)
    return len(kept_heads)


def _prune_mlp(mlp: nn.Module, hidden: torch.Tensor, channels: torch.Tensor, block: torch.Tensor) -> int:
    kept_hidden = torch.nonzero(hidden != 0).reshape(-1)
    kept = torch.nonzero((channels != 0) & (block != 0)).reshape(-1)
    mlp.fc1 = _linear(mlp.fc1.weight.detach()[kept][:, kept_hidden], mlp.fc1.bias.detach()[kept])
    scale = hidden * block
    weight = (mlp.fc2.weight.detach() * scale[:, None] * channels[None, :])[kept_hidden][:, kept]
    mlp.fc2 = _linear(weight, (mlp.fc2.bias.detach() * scale)[kept_hidden])
    return len(kept)


def _full_gates(gates: TowerGates, shape: TowerShape, like: torch.Tensor) -> TowerGates:
    return TowerGates(**{name: (getattr(gates, name).detach().to(like) if getattr(gates, name) is not None
                                else like.new_ones(shape.gate_shape(name))) for name in GATE_NAMES})


def _prune_embeddings(encoder: nn.Module, tower: str, hidden: torch.Tensor, kept: torch.Tensor) -> None:
    embeddings = encoder.embeddings
    if tower == "vision":
        conv = embeddings.patch_embedding
        new = nn.utils.skip_init(nn.Conv2d, conv.in_channels, len(kept), conv.kernel_size, stride=conv.stride,
                                 bias=False, device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight = nn.Parameter((conv.weight.detach() * hidden[:, None, None, None])[kept].clone())
        embeddings.patch_embedding = new
        embeddings.class_embedding = nn.Parameter((embeddings.class_embedding.detach() * hidden)[kept].clone())
        embeddings.embed_dim = len(kept)
    else:
        embeddings.token_embedding = _embedding((embeddings.token_embedding.weight.detach() * hidden)[:, kept])
    embeddings.position_embedding = _embedding((embeddings.position_embedding.weight.detach() * hidden)[:, kept])


def _prune_tower(model: nn.Module, tower: str, gates: TowerGates) -> None:
    encoder, projection_name, _ = _tower_parts(model, tower)
    tower_config = getattr(model.config, f"{tower}_config")
    shape = replace(TowerShape.of(tower_config), layers=len(encoder.encoder.layers))
    like = getattr(model, projection_name).weight.detach()
    full = _full_gates(gates, shape, like)
    kept = torch.nonzero(full.hidden != 0).reshape(-1)
    sources = list(getattr(tower_config, "pruned_layer_sources", range(shape.layers)))
    _prune_embeddings(encoder, tower, full.hidden, kept)
    for name in _TOWER_PARTS[tower][2]:
        setattr(encoder, name, _layer_norm(getattr(encoder, name), kept))
    layers, heads, channels, kept_sources = [], [], [], []
    for index, layer in enumerate(encoder.encoder.layers):
        attention_block, mlp_block = full.attention_layers[index], full.mlp_layers[index]
        if attention_block == 0 and mlp_block == 0:
            continue  # both blocks closed: the layer is the identity
        layer.layer_norm1 = _layer_norm(layer.layer_norm1, kept)
        layer.layer_norm2 = _layer_norm(layer.layer_norm2, kept)
        layer.embed_dim = len(kept)
        heads.append(_prune_attention(layer.self_attn, full.hidden, full.heads[index], attention_block))
        channels.append(_prune_mlp(layer.mlp, full.hidden, full.intermediate[index], mlp_block))
        layers.append(layer)
        kept_sources.append(sources[index])
    encoder.encoder.layers = nn.ModuleList(layers)
    projection = getattr(model, projection_name)
    setattr(model, projection_name, _linear(projection.weight.detach()[:, kept], None))
    setattr(model, f"{tower}_embed_dim", len(kept))
    _describe_compact(tower_config, len(kept), heads, channels, kept_sources)


def _describe_compact(tower_config, hidden: int, heads: list[int], channels: list[int], sources: list[int]) -> None:
    tower_config.pruned_head_dim = getattr(tower_config, "pruned_head_dim", TowerShape.of(tower_config).head_dim)
    tower_config.num_attention_heads = 1  # transformers checks that hidden_size splits into it; see pruned_*
    tower_config.hidden_size = hidden
    tower_config.num_hidden_layers = len(heads)
    tower_config.intermediate_size = max([0] + channels)
    tower_config.pruned_layer_heads = list(heads)
    tower_config.pruned_layer_intermediate = list(channels)
    tower_config.pruned_layer_sources = list(sources)


def prune_by_masks(model: nn.Module, masks: Mapping[str, TowerGates]) -> nn.Module:
    """The compact CLIPModel computing what ``model`` computes under ``masks`` (e.g. the deterministic gates at
    ``prune_step``): units whose gate is 0 are removed and the kept gates' values are folded into the weights
    (their ``prune`` methods, model.py).  ``model`` is left as it was; towers missing from ``masks`` are kept."""
    _check_gates(model, masks)
    compact = copy.deepcopy(model)
    with torch.no_grad():
        for tower, gates in masks.items():
            _prune_tower(compact, tower, gates)
    return compact


def compact_skeleton(model_class: type, config) -> nn.Module:
    """An untrained ``model_class`` (CLIPModel) shaped like the compact model whose config is ``config`` (per-layer
    heads and MLP widths from its ``pruned_layer_*`` records), ready for ``load_state_dict`` of its weights: what
    ``model_class(config)`` cannot build once the layers differ."""
    model = model_class(config)
    with torch.no_grad():
        for tower in TOWERS:
            tower_config = getattr(config, f"{tower}_config")
            if not hasattr(tower_config, "pruned_layer_heads"):
                continue
            head_dim, hidden = tower_config.pruned_head_dim, tower_config.hidden_size
            layers = _tower_parts(model, tower)[0].encoder.layers
            for layer, heads, channels in zip(layers, tower_config.pruned_layer_heads,
                                              tower_config.pruned_layer_intermediate):
                attention, width = layer.self_attn, max(1, heads) * head_dim
                like = attention.out_proj.weight
                for name in ("q_proj", "k_proj", "v_proj"):
                    setattr(attention, name, _linear(like.new_zeros(width, hidden), like.new_zeros(width)))
                attention.out_proj = _linear(like.new_zeros(hidden, width), like.new_zeros(hidden))
                attention.head_dim, attention.scale, attention.num_heads = head_dim, head_dim ** -0.5, max(1, heads)
                layer.mlp.fc1 = _linear(like.new_zeros(channels, hidden), like.new_zeros(channels))
                layer.mlp.fc2 = _linear(like.new_zeros(hidden, channels), like.new_zeros(hidden))
    return model


# ---------------------------------------------------------------- manual inheritance


def inherited_layer_indices(teacher_layers: int, student_layers: int, rule: str = "interval_front") -> list[int]:
    """The teacher layer each student layer inherits.  "interval_front" (TinyCLIP's only rule, weight_inherit.py
    83-85): ``i * (T // S)``; "front" (ours): the first ``S``."""
    if rule not in LAYER_RULES:
        raise ConfigError(f"manual inheritance: rule {rule!r} is not one of {', '.join(LAYER_RULES)}")
    if not 0 <= student_layers <= teacher_layers:
        raise ConfigError(f"manual inheritance: {student_layers} student layers from {teacher_layers} teacher layers")
    if rule == "front":
        return list(range(student_layers))
    step = teacher_layers // max(student_layers, 1)
    return list(range(0, student_layers * step, step))


def _teacher_key(key: str, layer_maps: Mapping[str, list[int]]) -> str:
    for encoder_name, indices in layer_maps.items():
        prefix = f"{encoder_name}.encoder.layers."
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            return f"{prefix}{indices[int(index)]}.{rest}"
    return key


def _check_manual_target(teacher_config, target_config) -> None:
    for tower in TOWERS:
        teacher_shape = TowerShape.of(getattr(teacher_config, f"{tower}_config"))
        target_shape = TowerShape.of(getattr(target_config, f"{tower}_config"))
        if target_shape.hidden % target_shape.heads or target_shape.head_dim != teacher_shape.head_dim:
            raise ConfigError(f"manual inheritance: target_config.{tower}_config splits hidden_size "
                              f"{target_shape.hidden} into {target_shape.heads} heads; TinyCLIP keeps the teacher's "
                              f"head width {teacher_shape.head_dim}")


def inherit_manual(teacher: nn.Module, target_config, rule: str = "interval_front") -> nn.Module:
    """A CLIPModel built from ``target_config`` (same class, device and dtype as ``teacher``) whose weights are the
    teacher's, TinyCLIP's manual rule (weight_inherit.py ``weight_inherit``): student layer ``i`` of each tower
    takes teacher layer `inherited_layer_indices` ``[i]``, and every tensor (q / k / v / out projections, LayerNorms,
    MLP fc1 / fc2, patch / class / position / token embeddings, projections, logit scale) its leading slice on
    every axis, i.e. the leading heads and channels."""
    _check_manual_target(teacher.config, target_config)
    layer_maps = {}
    for tower in TOWERS:
        encoder_name = _TOWER_PARTS[tower][0]
        layer_maps[encoder_name] = inherited_layer_indices(
            getattr(teacher.config, f"{tower}_config").num_hidden_layers,
            getattr(target_config, f"{tower}_config").num_hidden_layers, rule)
    reference = next(teacher.parameters())
    student = type(teacher)(target_config).to(device=reference.device, dtype=reference.dtype)
    source = teacher.state_dict()
    inherited = {}
    for key, value in student.state_dict().items():
        weight = source[_teacher_key(key, layer_maps)]
        if weight.dim() != value.dim() or any(s > t for s, t in zip(value.shape, weight.shape)):
            raise ConfigError(f"manual inheritance: target_config makes {key} {tuple(value.shape)}, larger than the "
                              f"teacher's {tuple(weight.shape)}")
        inherited[key] = weight[tuple(slice(0, size) for size in value.shape)]
    student.load_state_dict(inherited)
    return student


def shrink_config(config, vision: Mapping[str, int], text: Mapping[str, int]):
    """A copy of ``config`` (a CLIPConfig) with new tower sizes ``{"hidden_size": .., "num_hidden_layers": ..}``:
    heads = hidden_size // the head width, MLP width = hidden_size x the teacher's MLP ratio (TinyCLIP's configs:
    ``head_width`` 64 and ``mlp_ratio`` 4, model.py 569-576)."""
    target = copy.deepcopy(config)
    for tower, sizes in (("vision", vision), ("text", text)):
        tower_config = getattr(target, f"{tower}_config")
        shape = TowerShape.of(tower_config)
        unknown = set(sizes) - {"hidden_size", "num_hidden_layers"}
        if unknown:
            raise ConfigError(f"shrink_config: {tower} sizes {sorted(unknown)} are not hidden_size / num_hidden_layers")
        hidden = sizes.get("hidden_size", shape.hidden)
        if hidden % shape.head_dim:
            raise ConfigError(f"shrink_config: {tower} hidden_size {hidden} is not a multiple of the head width "
                              f"{shape.head_dim}")
        tower_config.hidden_size = hidden
        tower_config.num_attention_heads = hidden // shape.head_dim
        tower_config.intermediate_size = shape.intermediate * hidden // shape.hidden
        tower_config.num_hidden_layers = sizes.get("num_hidden_layers", shape.layers)
    return target


# ---------------------------------------------------------------- progressive multi-stage shrinking


@dataclass(frozen=True)
class ShrinkStage:
    """One automatic-inheritance stage of the authors' scripts (script/auto_weight_inherit_*.sh): the gates learn
    for ``prune_step`` steps while the target sparsity rises from ``start_sparsity`` to ``target_sparsity`` over
    ``sparsity_warmup`` steps, then the compact model trains on (6 epochs in all, lr 1e-4, --batch-size 1024 per GPU,
    ``--logit-scale 50``); a later stage resumes the previous one's compact model (``--load-last-stage``)."""

    name: str
    start_sparsity: float
    target_sparsity: float
    prune_step: int
    sparsity_warmup: int = 1000

    def options(self, **overrides) -> AutoInheritOptions:
        return AutoInheritOptions(start_sparsity=self.start_sparsity, target_sparsity=self.target_sparsity,
                                  sparsity_warmup=self.sparsity_warmup, prune_step=self.prune_step, **overrides)


TINYCLIP_AUTO_STAGES = (
    ShrinkStage("100to75", start_sparsity=0.0, target_sparsity=0.25, prune_step=3000),  # auto_..._100to75.sh
    ShrinkStage("75to50", start_sparsity=0.25, target_sparsity=0.5, prune_step=5000),  # auto_..._75to50.sh
    ShrinkStage("50to25", start_sparsity=0.5, target_sparsity=0.75, prune_step=8000),  # auto_..._50to25.sh
)


@dataclass(frozen=True)
class ManualStage:
    """One manual-inheritance stage (script/manual_weight_inherit_*.sh): ViT-B/32's towers shrunk to these sizes,
    inheriting from the previous stage's model (the first from ViT-B/32 itself), distilled from ViT-B/32."""

    name: str
    vision: tuple[tuple[str, int], ...]
    text: tuple[tuple[str, int], ...]


TINYCLIP_MANUAL_STAGES = (  # model_configs/TinyCLIP-ViT-61M-32-Text-29M.json, TinyCLIP-ViT-40M-32-Text-19M.json
    ManualStage("100to75", vision=(("hidden_size", 640), ("num_hidden_layers", 12)),
                text=(("hidden_size", 512), ("num_hidden_layers", 9))),
    ManualStage("75to50", vision=(("hidden_size", 512), ("num_hidden_layers", 12)),
                text=(("hidden_size", 512), ("num_hidden_layers", 6))),
)


def progressive_sparsity_targets(final_sparsity: float = 0.75,
                                 per_stage: float = 0.25) -> tuple[tuple[float, float], ...]:
    """(start, target) sparsity of each stage, ``per_stage`` more each time up to ``final_sparsity`` (the authors:
    0 -> 0.25 -> 0.5 -> 0.75, i.e. 100% -> 75% -> 50% -> 25% of the prunable weights)."""
    if not 0.0 < per_stage <= final_sparsity < 1.0:
        raise ConfigError(f"progressive shrinking: need 0 < per_stage <= final_sparsity < 1, got per_stage "
                          f"{per_stage}, final_sparsity {final_sparsity}")
    stages = round(final_sparsity / per_stage)
    if abs(stages * per_stage - final_sparsity) > 1e-9:
        raise ConfigError(f"progressive shrinking: final_sparsity {final_sparsity} is not a whole number of "
                          f"per_stage {per_stage} steps")
    return tuple((round(i * per_stage, 12), round((i + 1) * per_stage, 12)) for i in range(stages))


def _tower_layout(tower_config) -> tuple[list[int], list[int], list[int]]:
    layers = tower_config.num_hidden_layers
    heads = list(getattr(tower_config, "pruned_layer_heads", [tower_config.num_attention_heads] * layers))
    channels = list(getattr(tower_config, "pruned_layer_intermediate", [tower_config.intermediate_size] * layers))
    sources = list(getattr(tower_config, "pruned_layer_sources", range(layers)))
    return heads, channels, sources


def _kept_pattern(full_shape: TowerShape, hidden: int, layout, like: torch.Tensor) -> TowerGates:
    heads, channels, sources = layout
    pattern = TowerGates(**{name: like.new_zeros(full_shape.gate_shape(name)) for name in GATE_NAMES})
    pattern.hidden[:hidden] = 1
    for count_heads, count_channels, source in zip(heads, channels, sources):
        pattern.heads[source, :count_heads] = 1
        pattern.intermediate[source, :count_channels] = 1
        pattern.attention_layers[source] = 1
        pattern.mlp_layers[source] = 1
    return pattern


def expand_for_next_stage(compact: nn.Module, full_config) -> tuple[nn.Module, dict[str, TowerGates]]:
    """The next stage's starting point (their ``load_pruned_model``, model.py 1299-1412): a CLIPModel of
    ``full_config`` (the original architecture) holding ``compact``'s weights in its leading slots (layer ``i`` of
    the compact tower in its source layer, the heads / channels in the leading ones), zeros elsewhere, and per
    tower the 0/1 pattern of the units it holds; pass the pattern as ``kept`` to `ClipHardConcreteGates` (removed
    units start closed, log-alpha -10; lambdas start at 10 again).  Under those 0/1 gates the full model computes
    what ``compact`` computes."""
    reference = next(compact.parameters())
    full = type(compact)(full_config).to(device=reference.device, dtype=reference.dtype)
    patterns, layer_maps = {}, {}
    for tower in TOWERS:
        compact_config = getattr(compact.config, f"{tower}_config")
        layout = _tower_layout(compact_config)
        layer_maps[_TOWER_PARTS[tower][0]] = layout[2]
        full_shape = TowerShape.of(getattr(full_config, f"{tower}_config"))
        if compact_config.hidden_size > full_shape.hidden or max(layout[2], default=-1) >= full_shape.layers:
            raise ConfigError(f"expand_for_next_stage: full_config.{tower}_config is smaller than the compact model")
        patterns[tower] = _kept_pattern(full_shape, compact_config.hidden_size, layout, reference.detach())
    state = full.state_dict()
    with torch.no_grad():
        for key in state:
            state[key].zero_()  # their _copy_to_full_weight zeroes before it copies; a dropped layer stays 0
        for key, value in compact.state_dict().items():
            target = state[_teacher_key(key, layer_maps)]
            if value.dim() != target.dim() or any(s > t for s, t in zip(value.shape, target.shape)):
                raise ConfigError(f"expand_for_next_stage: {key} {tuple(value.shape)} does not fit full_config's "
                                  f"{tuple(target.shape)}")
            target[tuple(slice(0, size) for size in value.shape)] = value
    full.load_state_dict(state)
    return full, patterns
