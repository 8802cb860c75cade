"""TinyCLIP's weight inheritance on transformers' CLIPModel: manual inheritance slices, the hard-concrete / L0 gate
formulas against written-out float64 references, gates in the forward against edited weights, the compact model
against the gated one, the next stage's expansion, and the authors' defaults and stages."""
import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel

from kdzoo.errors import ConfigError
from kdzoo.tasks.clip.inherit import (
    TINYCLIP_AUTO_STAGES,
    TINYCLIP_MANUAL_STAGES,
    AutoInheritOptions,
    ClipHardConcreteGates,
    TowerGates,
    TowerShape,
    apply_gates,
    compact_skeleton,
    deterministic_gates,
    expand_for_next_stage,
    expected_remaining_parameters,
    hard_concrete_keep_probability,
    hard_concrete_sample,
    inherit_manual,
    inherited_layer_indices,
    lagrangian_penalty,
    progressive_sparsity_targets,
    prunable_parameters,
    prune_by_masks,
    scheduled_target_sparsity,
    shrink_config,
)

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # TinyCLIP l0module.py:12,20


def _config(vision=(32, 4, 4, 64), text=(32, 4, 4, 64), projection=16):
    """(hidden, heads, layers, intermediate) per tower; head width 8."""
    def tower(sizes):
        hidden, heads, layers, intermediate = sizes
        return {"hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers,
                    "intermediate_size": intermediate}
    return CLIPConfig(text_config=dict(tower(text), vocab_size=50, max_position_embeddings=12, bos_token_id=0,
                                       eos_token_id=49, pad_token_id=1),
                      vision_config=dict(tower(vision), image_size=16, patch_size=4), projection_dim=projection)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = CLIPModel(_config()).double().eval()
    with torch.no_grad():  # transformers starts biases at 0 and LayerNorms at 1: make every parameter count
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model


IDS = torch.randint(2, 49, (3, 8), generator=torch.Generator().manual_seed(1))
IDS[:, -1] = 49  # the end token the text tower pools at
PIXELS = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _embeds(model):
    with torch.no_grad():
        return (model.get_image_features(pixel_values=PIXELS.to(next(model.parameters()).dtype)).pooler_output,
                model.get_text_features(input_ids=IDS).pooler_output)


def _assert_same(got, expected, atol=1e-12):  # float64 tensors
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- manual inheritance


def test_layer_indices_follow_interval_front():
    assert inherited_layer_indices(12, 6) == [0, 2, 4, 6, 8, 10]
    assert inherited_layer_indices(12, 9) == list(range(9))  # step 12 // 9 = 1
    assert inherited_layer_indices(12, 5) == [0, 2, 4, 6, 8]
    assert inherited_layer_indices(4, 4) == [0, 1, 2, 3]
    assert inherited_layer_indices(12, 6, rule="front") == list(range(6))
    with pytest.raises(ConfigError, match="rule"):
        inherited_layer_indices(12, 6, rule="even")
    with pytest.raises(ConfigError, match="student layers"):
        inherited_layer_indices(4, 5)


def test_manual_inheritance_with_the_teachers_config_is_the_teacher(teacher):
    student = inherit_manual(teacher, teacher.config)
    assert student is not teacher and student.state_dict().keys() == teacher.state_dict().keys()
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    _assert_same(_embeds(student), _embeds(teacher), atol=0)


def test_manual_inheritance_keeps_leading_heads_and_channels(teacher):
    target = _config(vision=(24, 3, 2, 40), text=(16, 2, 3, 32), projection=12)
    student = inherit_manual(teacher, target)
    assert next(student.parameters()).dtype == torch.float64
    sv, tv = student.vision_model, teacher.vision_model
    for i, j in enumerate([0, 2]):  # 4 -> 2 layers, interval 2
        s, t = sv.encoder.layers[i], tv.encoder.layers[j]
        for name in ("q_proj", "k_proj", "v_proj"):
            # leading 3 heads of width 8 = rows 0..23, as (heads, head_dim, in) blocks
            assert torch.equal(getattr(s.self_attn, name).weight.view(3, 8, 24),
                               getattr(t.self_attn, name).weight.view(4, 8, 32)[:3, :, :24])
            assert torch.equal(getattr(s.self_attn, name).bias, getattr(t.self_attn, name).bias[:24])
        assert torch.equal(s.self_attn.out_proj.weight.view(24, 3, 8),
                           t.self_attn.out_proj.weight.view(32, 4, 8)[:24, :3])
        assert torch.equal(s.self_attn.out_proj.bias, t.self_attn.out_proj.bias[:24])
        assert torch.equal(s.mlp.fc1.weight, t.mlp.fc1.weight[:40, :24])
        assert torch.equal(s.mlp.fc1.bias, t.mlp.fc1.bias[:40])
        assert torch.equal(s.mlp.fc2.weight, t.mlp.fc2.weight[:24, :40])
        for norm in ("layer_norm1", "layer_norm2"):
            assert torch.equal(getattr(s, norm).weight, getattr(t, norm).weight[:24])
            assert torch.equal(getattr(s, norm).bias, getattr(t, norm).bias[:24])
    assert torch.equal(sv.embeddings.patch_embedding.weight, tv.embeddings.patch_embedding.weight[:24])
    assert torch.equal(sv.embeddings.class_embedding, tv.embeddings.class_embedding[:24])
    assert torch.equal(sv.embeddings.position_embedding.weight, tv.embeddings.position_embedding.weight[:, :24])
    assert torch.equal(sv.pre_layrnorm.weight, tv.pre_layrnorm.weight[:24])
    assert torch.equal(sv.post_layernorm.bias, tv.post_layernorm.bias[:24])
    st, tt = student.text_model, teacher.text_model
    for i in range(3):  # 4 -> 3 layers, interval 1: the first three
        assert torch.equal(st.encoder.layers[i].mlp.fc2.bias, tt.encoder.layers[i].mlp.fc2.bias[:16])
    assert torch.equal(st.embeddings.token_embedding.weight, tt.embeddings.token_embedding.weight[:, :16])
    assert torch.equal(st.embeddings.position_embedding.weight, tt.embeddings.position_embedding.weight[:, :16])
    assert torch.equal(st.final_layer_norm.weight, tt.final_layer_norm.weight[:16])
    assert torch.equal(student.visual_projection.weight, teacher.visual_projection.weight[:12, :24])
    assert torch.equal(student.text_projection.weight, teacher.text_projection.weight[:12, :16])
    assert torch.equal(student.logit_scale, teacher.logit_scale)
    image, text = _embeds(student)
    assert image.shape == (3, 12) and text.shape == (3, 12) and torch.isfinite(image).all()


def test_manual_inheritance_rejects_a_larger_or_differently_split_target(teacher):
    with pytest.raises(ConfigError, match="head width 8"):
        inherit_manual(teacher, _config(vision=(24, 4, 2, 40)))  # head width 6
    with pytest.raises(ConfigError, match="larger than the teacher"):
        inherit_manual(teacher, _config(vision=(32, 4, 2, 80)))
    with pytest.raises(ConfigError, match="student layers"):
        inherit_manual(teacher, _config(text=(32, 4, 6, 64)))


def test_shrink_config_and_the_manual_stages_make_tinyclips_sizes():
    vit_b32 = CLIPConfig(vision_config={"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
                                            "num_hidden_layers": 12, "patch_size": 32},
                         text_config={"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048,
                                          "num_hidden_layers": 12})
    first, second = TINYCLIP_MANUAL_STAGES
    assert (first.name, second.name) == ("100to75", "75to50")
    stage_1 = shrink_config(vit_b32, dict(first.vision), dict(first.text))
    vision, text = stage_1.vision_config, stage_1.text_config
    assert (vision.hidden_size, vision.num_attention_heads, vision.intermediate_size, vision.num_hidden_layers) == \
        (640, 10, 2560, 12)
    assert (text.hidden_size, text.num_attention_heads, text.intermediate_size, text.num_hidden_layers) == \
        (512, 8, 2048, 9)
    stage_2 = shrink_config(stage_1, dict(second.vision), dict(second.text))
    assert (stage_2.vision_config.hidden_size, stage_2.vision_config.num_attention_heads,
            stage_2.text_config.num_hidden_layers) == (512, 8, 6)
    assert vit_b32.vision_config.hidden_size == 768  # a copy
    with pytest.raises(ConfigError, match="head width"):
        shrink_config(vit_b32, {"hidden_size": 700}, {})
    with pytest.raises(ConfigError, match="heads"):
        shrink_config(vit_b32, {"heads": 4}, {})


# ---------------------------------------------------------------- gate formulas (float64, written out)


def _stretched_reference(log_alpha, u):
    s = 1 / (1 + math.exp(-(math.log(u) - math.log(1 - u) + log_alpha) / BETA))
    return min(1.0, max(0.0, s * (ZETA - GAMMA) + GAMMA))


def test_hard_concrete_sample_is_the_stretched_rectified_concrete():
    log_alpha = torch.linspace(-6, 6, 25, dtype=torch.float64)
    u = torch.rand(25, generator=torch.Generator().manual_seed(3), dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    z = hard_concrete_sample(log_alpha, u)
    expected = [_stretched_reference(a, b) for a, b in zip(log_alpha.tolist(), u.tolist())]
    torch.testing.assert_close(z, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (z == 0).any() and (z == 1).any()


def test_keep_probability_is_louizos_closed_form_and_the_sampling_frequency():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.7, 2.5, 10.0], dtype=torch.float64)
    closed = [min(1 - 1e-6, max(1e-6, 1 / (1 + math.exp(-(a - BETA * math.log(-GAMMA / ZETA))))))
              for a in log_alpha.tolist()]
    torch.testing.assert_close(hard_concrete_keep_probability(log_alpha),
                               torch.tensor(closed, dtype=torch.float64), rtol=0, atol=1e-12)
    u = torch.rand(100_000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    frequency = (hard_concrete_sample(log_alpha.expand(100_000, -1), u.expand(-1, 6)) > 0).double().mean(0)
    torch.testing.assert_close(frequency, hard_concrete_keep_probability(log_alpha), rtol=0, atol=5e-3)


def test_deterministic_gates_zero_the_expected_number_of_smallest_units():
    log_alpha = torch.randn(3, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    gates = deterministic_gates(log_alpha)
    soft = torch.sigmoid(log_alpha / BETA * 0.8)
    for row_alpha, row_gate, row_soft in zip(log_alpha, gates, soft):
        closed = [1 / (1 + math.exp(-(a - BETA * math.log(-GAMMA / ZETA)))) for a in row_alpha.tolist()]
        zeros = round(10 - sum(min(1 - 1e-6, max(1e-6, c)) for c in closed))
        order = torch.argsort(row_soft)
        assert (row_gate[order[:zeros]] == 0).all()
        torch.testing.assert_close(row_gate[order[zeros:]], row_soft[order[zeros:]], rtol=0, atol=0)
    assert (gates == 0).sum() > 0
    # a single open unit keeps sigmoid(10 / beta * 0.8) = sigmoid(12)
    torch.testing.assert_close(deterministic_gates(torch.tensor([[10.0]], dtype=torch.float64)),
                               torch.tensor([[1 / (1 + math.exp(-12))]], dtype=torch.float64), rtol=0, atol=1e-15)


def _count_reference(shape, keep, with_hidden):
    """l0module.py get_num_parameters_and_constraint as explicit sums over units."""
    D, H, I, L = shape.hidden, shape.heads, shape.intermediate, shape.layers
    per_head = (4 * D * D + 4 * D) // H
    per_channel = (2 * D * I + D + I) // I
    heads = [[keep.heads[l, h].item() * keep.attention_layers[l].item() for h in range(H)] for l in range(L)]
    channels = [[keep.intermediate[l, i].item() * keep.mlp_layers[l].item() for i in range(I)] for l in range(L)]
    if not with_hidden:
        return sum(map(sum, heads)) * per_head + sum(map(sum, channels)) * per_channel
    total = 0.0
    for d in range(D):
        s = keep.hidden[d].item()
        total += sum(s * p * per_head / D for row in heads for p in row)
        total += sum(2 * s * q for row in channels for q in row)
    return total


@pytest.mark.parametrize("with_hidden", [True, False])
def test_expected_parameters_follow_their_count(with_hidden):
    shape = TowerShape(hidden=8, heads=2, intermediate=12, layers=3)
    g = torch.Generator().manual_seed(6)
    keep = TowerGates(hidden=torch.rand(8, generator=g, dtype=torch.float64),
                      heads=torch.rand(3, 2, generator=g, dtype=torch.float64),
                      intermediate=torch.rand(3, 12, generator=g, dtype=torch.float64),
                      attention_layers=torch.rand(3, generator=g, dtype=torch.float64),
                      mlp_layers=torch.rand(3, generator=g, dtype=torch.float64))
    if not with_hidden:
        keep.hidden = None
    got = expected_remaining_parameters(shape, keep)
    assert got.item() == pytest.approx(_count_reference(shape, keep, with_hidden), rel=1e-12)
    assert prunable_parameters(shape) == 3 * (2 * ((4 * 64 + 32) // 2) + (2 * 8 * 12 + 8 + 12))


def test_prunable_parameters_of_vit_b32():
    assert prunable_parameters(TowerShape(768, 12, 3072, 12)) == 85_017_600  # image tower
    assert prunable_parameters(TowerShape(512, 8, 2048, 12)) == 37_804_032  # text tower


def test_lagrangian_penalty_is_one_sided():
    l1, l2 = torch.tensor(3.0, dtype=torch.float64), torch.tensor(5.0, dtype=torch.float64)
    below = lagrangian_penalty(torch.tensor(0.1, dtype=torch.float64), 0.4, l1, l2)
    assert below.item() == pytest.approx(3.0 * 0.3 + 5.0 * 0.09, rel=1e-12)
    assert lagrangian_penalty(torch.tensor(0.6, dtype=torch.float64), 0.4, l1, l2).item() == 0.0


def test_target_sparsity_warms_up_linearly():
    assert scheduled_target_sparsity(0, 0.25, 0.5, 1000) == 0.25
    assert scheduled_target_sparsity(400, 0.25, 0.5, 1000) == pytest.approx(0.35)
    assert scheduled_target_sparsity(1000, 0.25, 0.5, 1000) == 0.5
    assert scheduled_target_sparsity(5000, 0.25, 0.5, 1000) == 0.5
    assert scheduled_target_sparsity(0, 0.25, 0.5, 0) == 0.5


# ---------------------------------------------------------------- gates in the forward


def _ones(model):
    gates = {}
    for tower in ("vision", "text"):
        shape = TowerShape.of(getattr(model.config, f"{tower}_config"))
        gates[tower] = TowerGates(**{name: torch.ones(shape.gate_shape(name), dtype=torch.float64)
                                     for name in ("hidden", "heads", "intermediate", "attention_layers",
                                                  "mlp_layers")})
    return gates


def test_gates_at_one_leave_the_outputs_and_the_model_unchanged(teacher):
    plain = _embeds(teacher)
    with apply_gates(teacher, _ones(teacher)):
        assert _hooks(teacher) > 0
        gated = _embeds(teacher)
    _assert_same(gated, plain)
    assert _hooks(teacher) == 0
    _assert_same(_embeds(teacher), plain, atol=0)


def test_closed_heads_channels_and_blocks_equal_zeroed_weights(teacher):
    gates = _ones(teacher)
    gates["vision"].heads[1, 2] = 0.0
    gates["vision"].intermediate[3, [0, 5, 9]] = 0.0
    gates["text"].attention_layers[2] = 0.0
    gates["text"].heads[0, 0] = 0.5
    gates["text"].mlp_layers[1] = 0.0
    with apply_gates(teacher, gates):
        gated = _embeds(teacher)
    edited = inherit_manual(teacher, teacher.config)  # an exact copy
    with torch.no_grad():
        edited.vision_model.encoder.layers[1].self_attn.out_proj.weight[:, 16:24] = 0
        edited.vision_model.encoder.layers[3].mlp.fc2.weight[:, [0, 5, 9]] = 0
        edited.text_model.encoder.layers[2].self_attn.out_proj.weight.zero_()
        edited.text_model.encoder.layers[2].self_attn.out_proj.bias.zero_()
        edited.text_model.encoder.layers[0].self_attn.out_proj.weight[:, 0:8] *= 0.5
        edited.text_model.encoder.layers[1].mlp.fc2.weight.zero_()
        edited.text_model.encoder.layers[1].mlp.fc2.bias.zero_()
    _assert_same(gated, _embeds(edited))


def test_gate_shapes_are_checked(teacher):
    wrong = {"vision": TowerGates(heads=torch.ones(4, 3))}
    with pytest.raises(ConfigError, match="vision.heads"), apply_gates(teacher, wrong):
        pass
    with pytest.raises(ConfigError, match="unknown tower"), apply_gates(teacher, {"audio": TowerGates()}):
        pass
    assert _hooks(teacher) == 0


def _soft_gates(seed):
    g = torch.Generator().manual_seed(seed)

    def gate(*shape):
        values = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5
        values[torch.rand(*shape, generator=g) < 0.3] = 0.0
        return values
    gates = {}
    for tower in ("vision", "text"):
        gates[tower] = TowerGates(hidden=gate(32), heads=gate(4, 4), intermediate=gate(4, 64),
                                  attention_layers=torch.tensor([1.0, 0.0, 0.8, 0.0], dtype=torch.float64),
                                  mlp_layers=torch.tensor([1.0, 1.0, 0.7, 0.0], dtype=torch.float64))
        gates[tower].heads[2] = 0.0  # every head of layer 2 closed
    return gates


def test_compact_model_computes_the_gated_model(teacher):
    gates = _soft_gates(7)
    with apply_gates(teacher, gates):
        gated = _embeds(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    compact = prune_by_masks(teacher, gates)
    _assert_same(_embeds(compact), gated, atol=1e-10)  # float64 tensors
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key])  # the teacher is untouched
    vision = gates["vision"]
    kept_hidden = int((vision.hidden != 0).sum())
    config = compact.config.vision_config
    assert config.hidden_size == kept_hidden == compact.visual_projection.in_features
    assert config.pruned_layer_sources == [0, 1, 2]  # layer 3: both blocks closed, dropped
    layers = compact.vision_model.encoder.layers
    assert len(layers) == 3
    assert config.pruned_layer_heads == [int((vision.heads[0] != 0).sum()), 0, 0]
    assert layers[0].self_attn.q_proj.out_features == 8 * config.pruned_layer_heads[0]
    assert layers[1].self_attn.q_proj.out_features == 8  # the zero head standing in
    assert not layers[1].self_attn.out_proj.weight.any() and not layers[1].self_attn.out_proj.bias.any()
    assert config.pruned_layer_intermediate == [int((vision.intermediate[i] != 0).sum()) for i in range(3)]
    assert layers[2].mlp.fc1.weight.shape == (config.pruned_layer_intermediate[2], kept_hidden)
    assert layers[2].layer_norm1.weight.shape == (kept_hidden,)
    assert compact.vision_model.embeddings.patch_embedding.weight.shape[0] == kept_hidden
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_compact_model_is_rebuilt_from_its_saved_config(teacher):
    compact = prune_by_masks(teacher, _soft_gates(11))
    config = CLIPConfig.from_dict(compact.config.to_dict())  # as a saved run reads it back
    assert config.vision_config.pruned_layer_heads == compact.config.vision_config.pruned_layer_heads
    assert config.text_config.pruned_head_dim == 8
    rebuilt = compact_skeleton(CLIPModel, config).double().eval()
    rebuilt.load_state_dict(compact.state_dict())
    _assert_same(_embeds(rebuilt), _embeds(compact), atol=0)


def test_pruning_one_tower_keeps_the_other(teacher):
    gates = {"vision": _soft_gates(8)["vision"]}
    compact = prune_by_masks(teacher, gates)
    with apply_gates(teacher, gates):
        gated = _embeds(teacher)
    _assert_same(_embeds(compact), gated, atol=1e-10)  # float64 tensors
    assert compact.text_model.encoder.layers[0].mlp.fc1.out_features == 64


def test_expanded_model_with_its_pattern_computes_the_compact_model(teacher):
    compact = prune_by_masks(teacher, _soft_gates(9))
    full, kept = expand_for_next_stage(compact, teacher.config)
    assert full.config.vision_config.hidden_size == 32
    assert full.vision_model.encoder.layers[0].mlp.fc1.weight.shape == (64, 32)
    vision = compact.config.vision_config
    assert kept["vision"].hidden.sum() == vision.hidden_size
    assert kept["vision"].heads.sum(1).tolist() == vision.pruned_layer_heads + [0]
    assert kept["vision"].attention_layers.tolist() == [1, 1, 1, 0]
    assert not full.vision_model.encoder.layers[3].mlp.fc1.weight.any()  # the dropped layer is zeros
    with apply_gates(full, kept):
        expanded = _embeds(full)
    _assert_same(expanded, _embeds(compact), atol=1e-10)  # float64 tensors
    gates = ClipHardConcreteGates(teacher.config, kept=kept)
    alpha = gates.towers["vision"].log_alpha
    assert set(alpha) == {"hidden", "heads", "intermediate"}
    assert torch.equal(alpha["heads"], torch.where(kept["vision"].heads.float() != 0, 10.0, -10.0))
    assert gates.towers["text"].lambda_1.item() == 10.0
    with pytest.raises(ConfigError, match="smaller"):
        expand_for_next_stage(teacher, _config(vision=(16, 2, 4, 64)))
    with pytest.raises(ConfigError, match="expand_for_next_stage"):
        prune_by_masks(compact, {"vision": TowerGates()})


# ---------------------------------------------------------------- learnable gates, stages


def test_learnable_gates_start_with_the_authors_values(teacher):
    gates = ClipHardConcreteGates(teacher.config)
    assert gates.options == AutoInheritOptions(start_sparsity=0.0, target_sparsity=0.25, sparsity_warmup=1000,
                                               prune_step=3000, pruning_types=("hidden", "heads", "intermediate"),
                                               joint_sparsity=True, towers=("vision", "text"))
    tower = gates.towers["vision"]
    assert {k: tuple(v.shape) for k, v in tower.log_alpha.items()} == {"hidden": (32,), "heads": (4, 4),
                                                                        "intermediate": (4, 64)}
    assert all((a == 10.0).all() for a in tower.log_alpha.values())
    assert tower.lambda_1.item() == tower.lambda_2.item() == 10.0
    groups = gates.parameter_groups()
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [(0.02, 0.0, 6), (-0.02, 0.0, 4)]
    gates.train()
    drawn = gates()["text"]
    assert drawn.attention_layers is None and ((drawn.heads >= 0) & (drawn.heads <= 1)).all()
    gates.eval()
    fixed = gates()["vision"]
    torch.testing.assert_close(fixed.heads, torch.full((4, 4), 1 / (1 + math.exp(-12))), rtol=1e-6, atol=0)
    with torch.no_grad():
        tower.log_alpha["heads"].fill_(50.0)
    gates.constrain_()
    assert tower.log_alpha["heads"].max().item() == pytest.approx(math.log(100.0))


def test_joint_lagrangian_pools_both_towers(teacher):
    options = AutoInheritOptions(start_sparsity=0.0, target_sparsity=0.5, sparsity_warmup=100,
                                 pruning_types=("hidden", "heads", "intermediate", "layer"))
    gates = ClipHardConcreteGates(teacher.config, options).double()
    with torch.no_grad():
        gates.towers["vision"].log_alpha["heads"].uniform_(-2, 2)
        gates.towers["text"].lambda_1.fill_(4.0)
    vision, text = gates.towers["vision"], gates.towers["text"]
    remaining = vision.expected_remaining() + text.expected_remaining()
    pooled = 1 - remaining / (vision.prunable() + text.prunable())
    target = 0.5 * 40 / 100
    gap = max(target - pooled.item(), 0.0)
    assert gap > 0
    assert gates.lagrangian_loss(40).item() == pytest.approx((10 + 4) / 2 * gap + 10 * gap ** 2, rel=1e-12)
    separate = ClipHardConcreteGates(teacher.config, AutoInheritOptions(joint_sparsity=False, target_sparsity=0.5))
    sparsity = separate.expected_sparsity()
    expected = sum(10 * max(0.25 - sparsity[t].item(), 0) + 10 * max(0.25 - sparsity[t].item(), 0) ** 2
                   for t in ("vision", "text"))
    assert separate.lagrangian_loss(500).item() == pytest.approx(expected, rel=1e-6)


def test_a_mask_stage_reaches_sparsity_and_fuses_into_an_equal_compact_model(teacher):
    torch.manual_seed(10)
    student = inherit_manual(teacher, teacher.config)
    gates = ClipHardConcreteGates(student.config, AutoInheritOptions(target_sparsity=0.5, sparsity_warmup=0)).double()
    optimiser = torch.optim.AdamW(gates.parameter_groups())
    image_target, text_target = _embeds(teacher)
    first = gates.expected_sparsity()["joint"].item()
    for step in range(6):
        gates.train()
        with apply_gates(student, gates()):
            image = student.get_image_features(pixel_values=PIXELS).pooler_output
            text = student.get_text_features(input_ids=IDS).pooler_output
        loss = (image - image_target).square().mean() + (text - text_target).square().mean()
        loss = loss + gates.lagrangian_loss(step)
        optimiser.zero_grad()
        loss.backward()
        assert gates.towers["vision"].log_alpha["hidden"].grad.abs().sum() > 0
        optimiser.step()
        gates.constrain_()
    assert gates.expected_sparsity()["joint"].item() > first
    assert gates.towers["vision"].lambda_1.item() > 10.0  # ascent while below the target
    gates.eval()
    fused = gates()
    with apply_gates(student, fused):
        gated = _embeds(student)
    _assert_same(_embeds(prune_by_masks(student, fused)), gated, atol=1e-10)  # float64 tensors


def test_option_errors_name_the_option(teacher):
    for bad, match in (({"target_sparsity": 1.0}, "target_sparsity"), ({"start_sparsity": 0.5}, "start_sparsity"),
                       ({"prune_step": -1}, "prune_step"), ({"pruning_types": ("hidden", "heads")}, "pruning_types"),
                       ({"towers": ("vision",)}, "joint_sparsity"), ({"towers": ("audio",), "joint_sparsity": False},
                                                                      "towers")):
        with pytest.raises(ConfigError, match=match):
            ClipHardConcreteGates(teacher.config, AutoInheritOptions(**bad))


def test_progressive_stages_are_the_authors():
    assert [(s.name, s.start_sparsity, s.target_sparsity, s.prune_step, s.sparsity_warmup)
            for s in TINYCLIP_AUTO_STAGES] == [("100to75", 0.0, 0.25, 3000, 1000), ("75to50", 0.25, 0.5, 5000, 1000),
                                               ("50to25", 0.5, 0.75, 8000, 1000)]
    assert progressive_sparsity_targets() == ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75))
    assert progressive_sparsity_targets() == tuple((s.start_sparsity, s.target_sparsity)
                                                   for s in TINYCLIP_AUTO_STAGES)
    assert progressive_sparsity_targets(0.9, 0.3) == ((0.0, 0.3), (0.3, 0.6), (0.6, 0.9))
    options = TINYCLIP_AUTO_STAGES[1].options()
    assert (options.start_sparsity, options.target_sparsity, options.prune_step) == (0.25, 0.5, 5000)
    with pytest.raises(ConfigError, match="whole number"):
        progressive_sparsity_targets(0.7, 0.25)
    with pytest.raises(ConfigError, match="per_stage"):
        progressive_sparsity_targets(0.2, 0.25)
