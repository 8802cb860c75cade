"""The decoupled dataset-distillation base: observer (squeeze, reuse, load), SRe2L's BN-statistics matching, the
online-crop relabelling evaluation, and the engine options it needs (AdamW, cosine schedules)."""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdzoo.condense.decoupled as decoupled
from kdzoo.condense import condense, evaluate_synthetic
from kdzoo.condense.ddranking import DDRankingOptions, ddranking_scores
from kdzoo.condense.decoupled import BatchNormStatistics, ObserverCondenser, bn_statistics_loss, clamp_to_pixels
from kdzoo.condense.evaluate import EvalOptions, TeacherLabels, network_gradient
from kdzoo.condense.observer import observer_from_meta
from kdzoo.condense.relabel import LogitMix, OnlineCrops
from kdzoo.condense.space import InputSpace, split_tensors
from kdzoo.data import build_dataset
from kdzoo.engine.stacked import StackedModels, StackTraining, schedule_factor, stack_optimizer
from kdzoo.errors import ConfigError
from kdzoo.registry import CONDENSERS, register_condenser

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model_options": {"width": 8}, "observer_epochs": 2, "observer_options": {"norm": "batchnorm", "width": 8}}

if "test_bn_recover" not in CONDENSERS:
    @register_condenser("test_bn_recover", paper="a test subclass: CE + BN matching on the observer")
    @dataclass(eq=False)
    class BNRecover(ObserverCondenser):
        init: str = "noise"

        def matching_loss(self) -> torch.Tensor:
            with BatchNormStatistics(self.observer_network) as statistics:
                logits = self.observer_network(self.images)
            return F.cross_entropy(logits, self.labels) + 0.01 * statistics.loss(first_multiplier=10)


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", num_classes=4, image_size=16, train_size=64, test_size=32)


# --- BN statistics matching -------------------------------------------------------------------------------------


def test_bn_statistics_loss_is_the_sum_of_the_two_euclidean_norms():
    generator = torch.Generator().manual_seed(0)
    mean, var, running_mean, running_var = (torch.rand(5, generator=generator, dtype=torch.float64) for _ in range(4))
    expected = math.sqrt(sum((running_var - var) ** 2)) + math.sqrt(sum((running_mean - mean) ** 2))
    assert bn_statistics_loss(mean, var, running_mean, running_var).item() == pytest.approx(expected, rel=1e-12)


def test_batchnorm_hooks_match_a_hand_computed_layer_and_weight_the_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).double()
    for layer in (model[1], model[4]):
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    with BatchNormStatistics(model) as statistics:
        model(x)
    first_input = model[0](x)
    mean = first_input.mean((0, 2, 3))
    var = ((first_input - mean.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))  # biased, as BatchNorm normalises
    expected_first = (torch.sqrt(((model[1].running_var - var) ** 2).sum())
                      + torch.sqrt(((model[1].running_mean - mean) ** 2).sum()))
    assert statistics.losses[0].item() == pytest.approx(expected_first.item(), rel=1e-12)
    total = 10 * statistics.losses[0] + statistics.losses[1]
    assert statistics.loss(first_multiplier=10).item() == pytest.approx(total.item(), rel=1e-12)
    with BatchNormStatistics(model):
        pass
    assert not model[1]._forward_hooks  # the hooks are gone after the block


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(ConfigError, match="no BatchNorm"):
        BatchNormStatistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(4, 4)))


def test_recover_loss_lowers_and_images_stay_valid_pixels(data):
    condenser = CONDENSERS.build("test_bn_recover", data, 2, iterations=8, lr_img=0.05, **TINY)
    before = condenser.fixed_draw_loss(0)
    for _ in range(8):
        condenser.step()
    assert condenser.fixed_draw_loss(0) < before
    condenser.space = InputSpace((0.5,) * 3, (0.25,) * 3, pixels=True)  # a known [0, 1] pixel range
    with torch.no_grad():
        condenser.images[0].clamp_(-1.9, 1.9)  # pixels 0.025 .. 0.975: inside the range
    inside = condenser.images[0].detach().clone()
    clamp_to_pixels(condenser, condenser.images)
    pixels = condenser.space.to_pixels(condenser.images.detach())
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(condenser.images[0], inside, atol=1e-6)


# --- the observer -----------------------------------------------------------------------------------------------


def test_a_squeezed_observer_is_saved_and_reused_only_with_the_same_settings(data, tmp_path, monkeypatch):
    path = tmp_path / "observer.safetensors"
    first = CONDENSERS.build("test_bn_recover", data, 1, observer_file=str(path), **TINY)
    trained = {k: v.clone() for k, v in first.observer_network.state_dict().items()}
    assert path.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the saved observer should have been reused")

    monkeypatch.setattr(decoupled, "squeeze", no_training)
    again = CONDENSERS.build("test_bn_recover", data, 1, observer_file=str(path), **TINY)
    assert all(torch.equal(trained[k], v) for k, v in again.observer_network.state_dict().items())
    changed = CONDENSERS.build("test_bn_recover", data, 1, observer_file=str(path), **{**TINY, "observer_epochs": 3})
    with pytest.raises(AssertionError, match="reused"):
        changed.observer_network  # other settings: trained again, not read back


def test_observer_from_a_path_and_bad_sources(data, tmp_path):
    first = CONDENSERS.build("test_bn_recover", data, 1, observer_file=str(tmp_path / "o.safetensors"), **TINY)
    first.observer_network
    loaded = CONDENSERS.build("test_bn_recover", data, 1, observer=str(tmp_path / "o.safetensors"), **TINY)
    for k, v in first.observer_network.state_dict().items():
        assert torch.equal(loaded.observer_network.state_dict()[k], v)
    with pytest.raises(ConfigError, match="1000 ImageNet classes"):
        CONDENSERS.build("test_bn_recover", data, 1, observer="pretrained", observer_model="tv:resnet18").observer_network
    with pytest.raises(ConfigError, match="does-not-exist"):
        CONDENSERS.build("test_bn_recover", data, 1, observer=str(tmp_path / "does-not-exist"), **TINY).observer_network


def test_the_set_records_its_observer_and_evaluation_reloads_it(data, tmp_path):
    synthetic = condense("test_bn_recover", data, 2, iterations=2, progress=False,
                         observer_file=str(tmp_path / "observer.safetensors"), **TINY)
    assert synthetic.teacher is not None and synthetic.meta["eval"]["teacher_labels"] == "online"
    reloaded = observer_from_meta(synthetic.meta, torch.device("cpu"))
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(reloaded(x), synthetic.teacher(x))
    synthetic.save(tmp_path / "set.safetensors")
    results = evaluate_synthetic(type(synthetic).load(tmp_path / "set.safetensors"), data,
                                 EvalOptions(num_models=2, epochs=2), device="cpu", progress=False)
    assert len(results["convnet:convnet3"].accuracies) == 2
    missing = dict(synthetic.meta, observer={**synthetic.meta["observer"], "file": str(tmp_path / "gone")})
    with pytest.raises(ConfigError, match="missing"):
        observer_from_meta(missing, torch.device("cpu"))


class Constant(nn.Module):
    """A teacher that always says class `label`."""

    def __init__(self, label: int, classes: int):
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x):
        return F.one_hot(torch.full((len(x),), self.label), self.classes).float() * 50


def test_the_evaluation_trains_on_the_teachers_labels_not_the_sets(data):
    synthetic = condense("test_bn_recover", data, 2, iterations=1, progress=False, **TINY)
    synthetic.teacher = Constant(3, 4)
    results = evaluate_synthetic(synthetic, data, EvalOptions(num_models=2, epochs=30, lr=0.01), device="cpu",
                                 progress=False)
    _, test_labels = split_tensors(data.test)
    share_of_class_3 = 100 * float((test_labels == 3).double().mean())
    assert results["convnet:convnet3"].accuracies == pytest.approx([share_of_class_3] * 2)
    hard = evaluate_synthetic(synthetic, data, EvalOptions(num_models=1, epochs=2, teacher_labels="none"),
                              device="cpu", progress=False)
    assert len(hard["convnet:convnet3"].accuracies) == 1
    with pytest.raises(ConfigError, match="teacher_labels"):
        evaluate_synthetic(synthetic, data, EvalOptions(num_models=1, epochs=1, teacher_labels="stored"),
                           device="cpu", progress=False)


def test_ddranking_relabels_random_subsets_with_the_sets_teacher_and_drops_it_for_hard_labels(data):
    synthetic = condense("test_bn_recover", data, 2, iterations=1, progress=False, **TINY)
    synthetic.teacher = Constant(3, 4)
    options = DDRankingOptions(EvalOptions(epochs=30, lr=0.01), rounds=2, real_accuracy=50.0)
    scores = ddranking_scores(synthetic, data, options, device="cpu")["convnet:convnet3"]
    _, test_labels = split_tensors(data.test)
    share_of_class_3 = 100 * float((test_labels == 3).double().mean())
    assert scores.soft
    assert scores.random_any == pytest.approx([share_of_class_3] * 2)  # the random images took the teacher's labels
    assert scores.syn_any == pytest.approx([share_of_class_3] * 2)
    assert scores.hlr == pytest.approx([50.0 - a for a in scores.syn_hard])


def test_soft_target_cross_entropy_at_t_has_the_gradient_of_sre2l_kl():
    """CE(logits / T, p) - KL(p || softmax(logits / T)) is the entropy of p: same gradient (batch mean, no T^2)."""
    torch.manual_seed(0)
    template = nn.Linear(5, 4).double()
    params = {k: v.detach().clone() for k, v in template.named_parameters()}
    x, logits_teacher = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    targets = torch.softmax(logits_teacher / 4.0, -1)
    ours = network_gradient(template, temperature=4.0)(params, {}, x, targets)
    weight = params["weight"].clone().requires_grad_(True)
    student = (x @ weight.T + params["bias"]) / 4.0
    F.kl_div(F.log_softmax(student, -1), targets, reduction="batchmean").backward()
    assert torch.allclose(ours["weight"], weight.grad, rtol=1e-10, atol=1e-12)  # float64


def test_teacher_labels_are_the_softmax_at_the_temperature_chunked():
    teacher = nn.Linear(5, 4)
    x = torch.randn(7, 5)
    labels = TeacherLabels(teacher, 2.0, chunk=3).label(x)
    assert torch.allclose(labels, torch.softmax(teacher(x) / 2.0, -1), atol=1e-6)


# --- online crops -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_online_crops_mix_only_within_each_networks_batch(mix):
    torch.manual_seed(0)
    groups, per_group = 3, 4
    x = torch.arange(groups, dtype=torch.float32).repeat_interleave(per_group).view(-1, 1, 1, 1).expand(-1, 3, 8, 8)
    out = OnlineCrops(mix=mix).augment(x.contiguous(), groups=groups)
    assert out.shape == x.shape
    for g in range(groups):
        assert torch.allclose(out[g * per_group:(g + 1) * per_group], torch.tensor(float(g)))


def test_online_crops_refuse_bad_settings():
    with pytest.raises(ConfigError, match="scale"):
        OnlineCrops(scale=(0.5, 1.5))
    with pytest.raises(ConfigError, match="mix"):
        OnlineCrops(mix="mosaic")


# --- engine options ---------------------------------------------------------------------------------------------


def test_schedules_step_once_per_epoch():
    assert [schedule_factor("cosine", e, 4) for e in (0, 2, 4)] == pytest.approx([1, 0.5, 0])
    assert schedule_factor("half_cosine", 4, 4) == pytest.approx(0.5)
    assert schedule_factor("step", 3, 10, decay_epoch=5) == 1.0 and schedule_factor("step", 5, 10, decay_epoch=5) == 0.1
    with pytest.raises(ConfigError, match="schedule"):
        StackTraining(2, schedule="exponential")
    with pytest.raises(ConfigError, match="optimizer"):
        StackTraining(2, optimizer="lion")


def test_adamw_decays_only_conv_and_linear_weights_of_the_stack():
    stack = StackedModels([nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) for _ in range(2)])
    optimizer = stack_optimizer(stack, StackTraining(1, 1e-3, weight_decay=0.01, optimizer="adamw",
                                                     decay_weights_only=True))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed = {id(t) for g in optimizer.param_groups if g["weight_decay"] > 0 for t in g["params"]}
    assert decayed == {id(stack.params["0.weight"])}


def test_stacked_adamw_equals_one_adamw_per_network():
    torch.manual_seed(0)
    networks = [nn.Linear(3, 2) for _ in range(2)]
    copies = [nn.Linear(3, 2) for _ in range(2)]
    for a, b in zip(networks, copies):
        b.load_state_dict(a.state_dict())
    stack = StackedModels(networks)
    settings = StackTraining(1, 0.1, weight_decay=0.01, optimizer="adamw")
    optimizer = stack_optimizer(stack, settings)
    x = torch.randn(2, 5, 3)
    y = torch.randint(0, 2, (2, 5))
    for _ in range(3):
        grads = stack.gradients(network_gradient(stack.template), x, y)
        for name, tensor in stack.params.items():
            tensor.grad = grads[name]
        optimizer.step()
    for k, network in enumerate(copies):
        single = torch.optim.AdamW(network.parameters(), lr=0.1, weight_decay=0.01)
        for _ in range(3):
            single.zero_grad()
            F.cross_entropy(network(x[k]), y[k]).backward()
            single.step()
        assert torch.allclose(stack.params["weight"][k], network.weight, atol=1e-6)


def test_dbr_is_an_evaluation_mode_for_any_set_with_a_teacher(data):
    import kdzoo.condense.nrrdd  # noqa: F401  (registers the "dbr" mode)
    synthetic = condense("test_bn_recover", data, 2, iterations=1, progress=False, **TINY)
    results = evaluate_synthetic(synthetic, data, EvalOptions(num_models=2, epochs=2, teacher_labels="dbr"),
                                 device="cpu", progress=False)
    assert len(results["convnet:convnet3"].accuracies) == 2


def test_online_crops_shuffle_patches_first():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    out = OnlineCrops(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=0.0, mix="none",
                      patch_shuffle=2).augment(image)
    patches = lambda x: sorted(x[0, 0, r:r + 2, c:c + 2].flatten().tolist() for r in (0, 2) for c in (0, 2))  # noqa: E731
    assert patches(out) == patches(image)  # the same 2x2 patches, possibly moved


def test_a_batch_specific_teacher_labels_each_networks_batch_whole():
    class Recording(nn.Module):
        batch_specific = True

        def __init__(self):
            super().__init__()
            self.sizes = []

        def forward(self, x):
            self.sizes.append(len(x))
            return torch.zeros(len(x), 3)

    teacher = Recording()
    TeacherLabels(teacher, 1.0, chunk=2).label(torch.randn(12, 5), groups=3)
    assert teacher.sizes == [4, 4, 4]


def test_static_label_mixing_is_the_softmax_of_the_interpolated_logits():
    """INFER's val_static.py: target = softmax((lam l_i + (1 - lam) l_j) / T) from the stored logits."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    stored = torch.softmax(logits / 30.0, -1)
    x = torch.arange(6, dtype=torch.float64).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    mixed_x, mixed_y = LogitMix()(x, stored, groups=2)
    for row in range(6):
        value, found = mixed_x[row, 0, 0, 0], False
        for partner in range(3 * (row // 3), 3 * (row // 3) + 3):  # partners come from the row's own batch
            if partner == row:
                found = found or (bool(torch.isclose(value, x[row, 0, 0, 0]))
                                  and torch.allclose(mixed_y[row].double(), stored[row], atol=1e-6))
                continue
            lam = (value - x[partner, 0, 0, 0]) / (x[row, 0, 0, 0] - x[partner, 0, 0, 0])
            if 0 <= lam <= 1:
                expected = torch.softmax((lam * logits[row] + (1 - lam) * logits[partner]) / 30.0, -1)
                found = found or torch.allclose(mixed_y[row].double(), expected, atol=1e-6)
        assert found


def test_the_static_mode_trains_on_the_stored_soft_labels(data):
    synthetic = condense("test_bn_recover", data, 2, iterations=1, progress=False, **TINY)
    synthetic.labels = F.one_hot(torch.full((len(synthetic.labels),), 2), 4).float() * 0.97 + 0.01
    synthetic.teacher = None
    results = evaluate_synthetic(synthetic, data, EvalOptions(num_models=2, epochs=30, lr=0.01, teacher_labels="static",
                                                              temperature=1.0), device="cpu", progress=False)
    _, test_labels = split_tensors(data.test)
    share_of_class_2 = 100 * float((test_labels == 2).double().mean())
    assert results["convnet:convnet3"].accuracies == pytest.approx([share_of_class_2] * 2)


def test_any_zoo_classifier_can_be_squeezed_as_the_observer(data):
    condenser = CONDENSERS.build("test_bn_recover", data, 1, observer_model="cifar:resnet8", observer_options={},
                                 observer_epochs=1, model_options={"width": 8})
    assert type(condenser.observer_network).__name__ != "ConvNet" and not condenser.observer_network.training
    assert 0.0 <= condenser.observer_accuracy(*split_tensors(data.test)) <= 100.0
    condenser.step()  # BN matching through the ResNet's BatchNorm layers
