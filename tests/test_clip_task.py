"""kdzoo clip: dual encoders trained on image-caption pairs on the engine (a contrastive teacher, students distilled
with registered methods), their losses against written-out formulas, zero-shot top-1 and retrieval recall against
brute force, deterministic captions, exact resume after a kill, run folders that load back, one-line errors."""
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from kdzoo.tasks.clip.continual import ClipContinualConfig  # noqa: E402
from kdzoo.cli import main  # noqa: E402
from kdzoo.config import from_dict, load_config  # noqa: E402
from kdzoo.engine.checkpoint import load_checkpoint  # noqa: E402
from kdzoo.errors import ConfigError  # noqa: E402
from kdzoo.registry import CLIP_METHODS  # noqa: E402
from kdzoo.tasks.clip import evaluation as E  # noqa: E402
from kdzoo.tasks.clip.config import (CLIP_CIFAR_TEMPLATES, LN_100, ClipDataConfig, ClipDistillConfig,  # noqa: E402
                                     ClipModelConfig, ClipRunConfig)
from kdzoo.tasks.clip.data import (DIGIT_NAMES, captioned_dataset, epoch_captions, epoch_order,  # noqa: E402
                                   pairs_dataset, read_pairs)
from kdzoo.tasks.clip.method_base import clip_contrastive_loss  # noqa: E402
from kdzoo.tasks.clip.methods.feature import ClipFeatureDistillation  # noqa: E402
from kdzoo.tasks.clip.models import (ClipOutputs, ImageAdapter, ImageGeometry, WordTokenizer,  # noqa: E402
                                     build_encoder, load_encoder)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention

REPO = Path(__file__).resolve().parents[1]
TINY = {"source": "config", "vision": {"hidden_size": 16, "layers": 1, "heads": 2, "patch_size": 4},
        "text": {"hidden_size": 16, "layers": 1, "heads": 2, "max_length": 12}, "projection_dim": 16}
STUDENT = {**TINY, "projection_dim": 8}  # narrower than the teacher: clip_fd projects it into the teacher's width
TRAIN = {"epochs": 2, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 0, "schedule": "constant",
         "device": "cpu", "progress": False, "retrieval_pairs": 100}


def _write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _teacher_config(tmp_path, name, **train):
    return _write(tmp_path, name, {"model": TINY, "data": {"dataset": "digits"}, "train": {**TRAIN, **train},
                                   "output_dir": str(tmp_path), "name": name})


def _distill_config(tmp_path, teacher, name, method, **train):
    return _write(tmp_path, name, {"teacher": str(teacher), "method": method, "model": STUDENT,
                                   "train": {**TRAIN, **train}, "output_dir": str(tmp_path), "name": name})


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    assert main(["clip", "teacher", _teacher_config(root, "teacher", epochs=8)]) == 0
    return root / "teacher"


# ---------------------------------------------------------------- losses against written-out formulas


def test_contrastive_loss_is_the_symmetric_infonce_written_out():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    total = 0.0
    for i in range(6):  # image i against every caption, then caption i against every image
        row = [float(scale) * float(images[i] @ texts[j]) for j in range(6)]
        column = [float(scale) * float(texts[i] @ images[j]) for j in range(6)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -column[i] + math.log(sum(math.exp(v) for v in column))
    expected = total / (2 * 6)
    assert clip_contrastive_loss(images, texts, scale).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)  # float64 tensors


def test_clip_fd_is_mse_of_normalised_embeddings_plus_the_contrastive_loss_with_clip_kds_weights():
    entry = CLIP_METHODS.get("clip_fd")
    assert entry.defaults == {"fd_weight": 2000.0, "contrastive_weight": 1.0}  # CLIP-KD script/methods/FD.sh
    g = torch.Generator().manual_seed(1)
    s_img, s_txt, t_img, t_txt = (torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64),
                                                                dim=1) for _ in range(4))
    written = sum(float((a - b).pow(2).sum()) for a, b in zip(s_img, t_img)) / 12 + \
        sum(float((a - b).pow(2).sum()) for a, b in zip(s_txt, t_txt)) / 12
    class Width(torch.nn.Module):  # what attach reads of a dual encoder
        def __init__(self, dim):
            super().__init__()
            self.embed_dim = dim

    method = ClipFeatureDistillation(fd_weight=3.0, contrastive_weight=0.5)
    method.attach(Width(3), Width(3))
    assert method.image_projection is None and method.parameter_groups() == []
    student = ClipOutputs(s_img, s_txt, torch.tensor(10.0, dtype=torch.float64))
    teacher = ClipOutputs(t_img, t_txt, torch.tensor(20.0, dtype=torch.float64))
    terms = method.loss(None, student, teacher, 0)
    assert terms["fd"].item() == pytest.approx(3.0 * written, rel=1e-12)
    assert terms["contrastive"].item() == pytest.approx(0.5 * clip_contrastive_loss(s_img, s_txt, 10.0).item())

    torch.manual_seed(0)
    method = ClipFeatureDistillation()
    method.attach(Width(2), Width(3))  # widths differ: a linear layer per tower, applied before normalising
    raw_img, raw_txt = torch.randn(4, 2), torch.randn(4, 2)
    student = ClipOutputs(torch.nn.functional.normalize(raw_img, dim=1), torch.nn.functional.normalize(raw_txt, dim=1),
                          torch.tensor(10.0), image_projections=raw_img, text_projections=raw_txt)
    terms = method.loss(None, student, ClipOutputs(t_img.float(), t_txt.float(), torch.tensor(20.0)), 0)
    projected = torch.nn.functional.normalize(raw_img @ method.image_projection.weight.T + method.image_projection.bias,
                                              dim=1)
    text = torch.nn.functional.normalize(raw_txt @ method.text_projection.weight.T + method.text_projection.bias, dim=1)
    expected = 2000.0 * (((projected - t_img.float()) ** 2).mean() + ((text - t_txt.float()) ** 2).mean())
    torch.testing.assert_close(terms["fd"], expected, rtol=1e-5, atol=0)
    (group,) = method.parameter_groups()
    assert len(group["params"]) == 4 and group["weight_decay"] == 0.01  # AdamW's default, as CLIP-KD's group


# ---------------------------------------------------------------- metrics against brute force


def test_zero_shot_top1_is_the_nearest_mean_prompt_embedding():
    g = torch.Generator().manual_seed(2)
    prompts = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)  # 4 classes x 3 templates
    images = torch.randn(20, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (20,), generator=g)
    weights = E.class_embeddings(prompts)
    correct = 0
    for image, label in zip(images, labels):
        best, best_class = -2.0, None
        for c in range(4):
            mean = sum(p / p.norm() for p in prompts[c]) / 3
            cosine = float(image @ (mean / mean.norm())) / float(image.norm())
            if cosine > best:
                best, best_class = cosine, c
        correct += best_class == int(label)
    assert E.zero_shot_top1(images, weights, labels) == pytest.approx(100.0 * correct / 20, abs=1e-9)  # float64 tensors


def _brute_force_ranks(images, texts):
    images = images / images.norm(dim=1, keepdim=True)
    texts = texts / texts.norm(dim=1, keepdim=True)
    scores = images @ texts.T
    n = len(images)
    image_ranks = [sum(bool(scores[i, j] > scores[i, i]) for j in range(n)) for i in range(n)]
    text_ranks = [sum(bool(scores[j, i] > scores[i, i]) for j in range(n)) for i in range(n)]
    return image_ranks, text_ranks


@pytest.mark.parametrize("block", [1024, 7])  # one block, and several (the true pairs' values from the same block)
def test_retrieval_recall_matches_brute_force_with_repeated_captions(block, monkeypatch):
    monkeypatch.setattr(E, "SIMILARITY_ROWS", block)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(30, 8, generator=g, dtype=torch.float64)
    texts = images + 0.9 * torch.randn(30, 8, generator=g, dtype=torch.float64)
    texts[10] = texts[3]  # a repeated caption ties with the true one: it counts as found
    image_ranks, text_ranks = _brute_force_ranks(images, texts)
    got = E.retrieval_recall(images, texts)
    for k in (1, 5, 10):
        assert got[f"i2t_r{k}"] == pytest.approx(100.0 * sum(r < k for r in image_ranks) / 30, abs=1e-9)  # float64 tensors
        assert got[f"t2i_r{k}"] == pytest.approx(100.0 * sum(r < k for r in text_ranks) / 30, abs=1e-9)  # float64 tensors
    assert got["mean_recall"] == pytest.approx(sum(v for key, v in got.items() if key != "mean_recall") / 6)
    assert 0 < got["i2t_r1"] < 100 and got["t2i_r10"] > got["t2i_r1"]  # the data separates the Ks
    assert torch.equal(E.retrieval_rows(30, 0), torch.arange(30)) and torch.equal(E.retrieval_rows(30, 50),
                                                                                  torch.arange(30))
    subset = E.retrieval_rows(1000, 100)  # a fixed-seed subset, not the head of a split sorted by class
    assert torch.equal(subset, E.retrieval_rows(1000, 100)) and subset.unique().numel() == 100
    assert torch.equal(subset, subset.sort().values) and subset.max() > 500


# ---------------------------------------------------------------- captions, tokens, images


def test_captions_are_templates_of_class_names_drawn_deterministically_per_epoch():
    data = captioned_dataset(ClipDataConfig(dataset="digits"))
    assert data.class_names == list(DIGIT_NAMES) and data.templates == list(CLIP_CIFAR_TEMPLATES)
    assert len(data.captions) == 18 * 10 and data.captions[data.prompt_indices()[7, 1]] == "a blurry photo of a seven."
    train = data.train
    first = epoch_captions(train, seed=0, epoch=0)
    assert torch.equal(first, epoch_captions(train, seed=0, epoch=0))  # a function of (seed, epoch) alone
    assert not torch.equal(first, epoch_captions(train, seed=0, epoch=1))
    assert not torch.equal(first, epoch_captions(train, seed=1, epoch=0))
    assert torch.equal(first % 10, train.labels)  # every caption names the image's class
    assert len(set((first // 10).tolist())) == 18  # every template is drawn
    assert torch.equal(epoch_order(len(train), 0, 3), epoch_order(len(train), 0, 3))
    assert sorted(epoch_order(len(train), 0, 3).tolist()) == list(range(len(train)))
    assert data.test.first_captions().tolist() == data.test.labels.tolist()  # held-out pairs: "a photo of a {}."


def test_word_tokenizer_pads_cuts_and_keeps_the_end_token(tmp_path):
    tokenizer = WordTokenizer.from_captions(["A photo of a cat.", "a dog"], max_length=5)
    assert tokenizer.words == [".", "a", "cat", "dog", "of", "photo"] and tokenizer.vocab_size == 10
    ids, mask = tokenizer(["a dog", "a photo of a cat.", "a zebra"])
    index = tokenizer.index
    assert ids[0].tolist() == [2, index["a"], index["dog"], 3, 0] and mask[0].tolist() == [1, 1, 1, 1, 0]
    assert ids[1].tolist() == [2, index["a"], index["photo"], index["of"], 3] and mask[1].all()
    assert ids[2].tolist() == [2, index["a"], 1, 3, 0]  # an unknown word
    tokenizer.save(tmp_path)
    again = WordTokenizer.load(tmp_path / "tokenizer.json")
    assert torch.equal(again(["a photo of a cat."])[0], ids[1:2])


def test_image_adapter_resizes_repeats_grey_and_renormalises():
    cfg = ClipModelConfig(pixel_mean=[0.4, 0.5, 0.6], pixel_std=[0.2, 0.25, 0.3])
    adapter = ImageAdapter.between(ImageGeometry(4, 1, (0.3,), (0.5,)), 8, 3, cfg)
    images = torch.rand(2, 1, 4, 4)
    out = adapter(images)
    resized = torch.nn.functional.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False)
    pixels = resized * 0.5 + 0.3  # back to [0, 1], then into the model's normalisation
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected = (pixels - mean) / std
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="normalisation is not known"):
        ImageAdapter.between(ImageGeometry(8, 1), 8, 3, cfg)


def test_dual_encoder_outputs_normalised_embeddings_the_scale_and_hidden_states():
    data_cfg = ClipDataConfig(dataset="digits")
    data = captioned_dataset(data_cfg)
    torch.manual_seed(0)
    encoder, tokenizer = build_encoder(from_dict(ClipModelConfig, TINY), data.geometry, data.captions)
    images = data.train.images_at(torch.arange(3))
    ids, mask = tokenizer(data.captions[:3])
    out = encoder(images, ids, mask, hidden_states=True)
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(encoder.encode_image(images), dim=1))
    torch.testing.assert_close(out.text_embeds, torch.nn.functional.normalize(encoder.encode_text(ids, mask), dim=1))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)  # exp of CLIP's initial log scale
    assert len(out.image_features) == len(out.text_features) == 2  # the embeddings, then the one layer
    assert out.image_features[0].shape == (3, 5, 16)  # four 4x4 patches of the 8x8 digits, and the class token
    assert encoder(images, ids, mask).image_features is None


def test_captioned_images_from_a_folder_a_csv_and_a_jsonl_agree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        captions = [f"picture number {i}"] + (["a second caption"] if i == 2 else [])
        (folder / f"img{i}.txt").write_text("\n".join(captions) + "\n")
        rows += [{"path": f"pairs/img{i}.png", "text": c} for c in captions]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "text"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = [sorted(read_pairs(ClipDataConfig(pairs=str(source), image_key="path", caption_key="text")))
             for source in (folder, tmp_path / "pairs.csv", tmp_path / "pairs.jsonl")]
    assert found[0] == found[1] == found[2] and len(found[0]) == 7
    data = pairs_dataset(ClipDataConfig(pairs=str(tmp_path / "pairs.csv"), image_key="path", caption_key="text",
                                        image_size=8, test_fraction=0.34))
    assert (len(data.train), len(data.test)) == (4, 2) and data.class_names is None
    assert data.train.images_at(torch.arange(4)).shape == (4, 3, 8, 8)
    assert sorted(data.train.counts.tolist() + data.test.counts.tolist()) == [1, 1, 1, 1, 1, 2]
    with pytest.raises(ConfigError, match="no 'caption' column"):
        read_pairs(ClipDataConfig(pairs=str(tmp_path / "pairs.csv"), image_key="path"))


# ---------------------------------------------------------------- runs through the command line


def test_teacher_run_learns_exports_and_loads_back(teacher_run, capsys):
    for name in ("model.safetensors", "encoder.json", "tokenizer.json", "metrics.csv", "summary.json",
                 "checkpoint.pt", "config.yaml"):
        assert (teacher_run / name).is_file(), name
    last = _rows(teacher_run)[-1]
    assert float(last["test_zeroshot_top1"]) > 40  # chance: 10% (about 75% after these 8 epochs)
    assert main(["clip", "eval", str(teacher_run), "--device", "cpu", "--retrieval-pairs", "100"]) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(str(teacher_run))]
    # the exported encoder scores what the run's last evaluation did
    assert float(row[1]) == pytest.approx(float(last["test_zeroshot_top1"]), abs=0.006)
    assert float(row[2]) == pytest.approx(float(last["test_i2t_r1"]), abs=0.006)
    encoder, tokenizer = load_encoder(teacher_run)
    assert tokenizer.vocab_size == encoder.backbone.model.config.text_config.vocab_size


def test_the_log_logit_scale_is_clamped_to_ln_100_after_each_update(tmp_path):
    # from log scale 6 a few small Adam steps could not come down to ln 100 (about 4.6): the clamp does it
    assert main(["clip", "teacher", _teacher_config(tmp_path, "hot", epochs=1), "model.logit_scale_init=6.0"]) == 0
    scale = load_checkpoint(tmp_path / "hot" / "checkpoint.pt")["student"]["backbone.model.logit_scale"]
    assert 4.0 < float(scale) <= float(torch.tensor(LN_100, dtype=scale.dtype))


def test_distill_with_clip_fd_trains_the_student_and_its_projections(tmp_path, teacher_run):
    config = _distill_config(tmp_path, teacher_run, "fd", {"name": "clip_fd", "fd_weight": 100.0}, epochs=1)
    assert main(["clip", "distill", config]) == 0
    run = tmp_path / "fd"
    row = _rows(run)[-1]
    assert float(row["loss_fd"]) > 0 and float(row["loss_contrastive"]) > 0 and "test_zeroshot_top1" in row
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["method"]["image_projection.weight"].shape == (16, 8)  # student 8 -> teacher 16
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "clip_fd"
    student, _ = load_encoder(run)
    assert student.embed_dim == 8


def test_a_killed_distillation_resumes_bit_identical(tmp_path, teacher_run, monkeypatch):
    from kdzoo.tasks.clip.task import ClipTask

    method = {"name": "clip_fd", "fd_weight": 100.0}
    straight = _distill_config(tmp_path, teacher_run, "straight", method, save_every_steps=4)
    assert main(["clip", "distill", straight]) == 0
    original = ClipTask.micro_batch

    def killed_at_step_30(self, rows, captions, step):
        if step == 30:  # inside the second epoch (21 steps each); the last checkpoint is step 28's
            raise KeyboardInterrupt
        return original(self, rows, captions, step)

    config = _distill_config(tmp_path, teacher_run, "resumed", method, save_every_steps=4)
    monkeypatch.setattr(ClipTask, "micro_batch", killed_at_step_30)
    assert main(["clip", "distill", config]) == 130
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 28
    monkeypatch.setattr(ClipTask, "micro_batch", original)
    assert main(["clip", "distill", config, "--resume"]) == 0
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    for key in ("student", "method"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert _rows(tmp_path / "straight")[-1]["test_zeroshot_top1"] == _rows(tmp_path / "resumed")[-1][
        "test_zeroshot_top1"]


def test_a_pretrained_transformers_folder_teaches_a_copy_of_itself(tmp_path, capsys):
    """A CLIPModel folder with its own Hugging Face tokenizer as `teacher_model`; the student (model unset) starts as
    a copy of it, and its run folder keeps the tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    data = captioned_dataset(ClipDataConfig(dataset="digits"))
    words = ["<pad>", "<unk>", "<start>", "<end>"] + sorted({w for c in data.captions for w in c.replace(".", " .")
                                                              .split()})
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = TemplateProcessing(single="<start> $A <end>", special_tokens=[("<start>", 2), ("<end>", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<start>", eos_token="<end>")
    folder = tmp_path / "pretrained"
    torch.manual_seed(0)
    encoder, _ = build_encoder(from_dict(ClipModelConfig, TINY), data.geometry, data.captions)
    encoder.backbone.model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    config = _write(tmp_path, "copy", {"teacher_model": {"source": "transformers", "path": str(folder)},
                                       "data": {"dataset": "digits"}, "method": "clip_fd",
                                       "train": {**TRAIN, "epochs": 1, "lr": 0.0}, "output_dir": str(tmp_path),
                                       "name": "copy"})
    assert main(["clip", "distill", config]) == 0
    run = tmp_path / "copy"
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert float(_rows(run)[0]["loss_fd"]) == 0.0  # the student is a copy of the teacher (and lr 0 keeps it so)
    assert main(["clip", "eval", str(run), "--device", "cpu"]) == 0
    assert any(line.startswith(str(run)) for line in capsys.readouterr().out.splitlines())


def test_bad_configs_are_one_line_errors(tmp_path, teacher_run, capsys):
    config = _teacher_config(tmp_path, "bad")
    cases = [(["clip", "teacher", config, "model.vision.hiden_size=8"], "did you mean 'hidden_size'"),
             (["clip", "teacher", config, "train.schedule=linear"], "train.schedule: 'linear' is not one of"),
             (["clip", "teacher", config, "model.vision.heads=3"], "does not split into 3 heads"),
             (["clip", "teacher", config, "data.pairs=somewhere"], "one of them"),
             (["clip", "distill", _distill_config(tmp_path, teacher_run, "b1", {"name": "clip_fd", "fd_weigth": 1})],
              "unknown option 'fd_weigth'"),
             (["clip", "distill", _distill_config(tmp_path, teacher_run, "b2", {"name": "clip_fd", "fd_weight": -1})],
              "method.fd_weight (clip_fd): expected a finite number >= 0"),
             (["clip", "distill", _distill_config(tmp_path, teacher_run, "b3", "no_such_method")], "unknown clip method"),
             (["clip", "distill", _distill_config(tmp_path, tmp_path / "nowhere", "b4", "clip_fd")],
              "not a kdzoo clip run directory")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "b4").exists()  # a failed start leaves no run folder


def test_missing_open_clip_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    config = _teacher_config(tmp_path, "oc")
    assert main(["clip", "teacher", config, "model.source=open_clip", "model.name=ViT-B-32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'kdzoo[clip]'" in err[0]


def test_methods_are_listed_and_examples_load(capsys):
    assert main(["methods", "--clip"]) == 0
    out = capsys.readouterr().out
    assert "clip_fd" in out and "contrastive" in out
    assert main(["methods", "--clip", "clip_fd"]) == 0
    assert "fd_weight" in capsys.readouterr().out
    assert main(["methods", "--tasks"]) == 0 and "clip" in capsys.readouterr().out
    examples = sorted((REPO / "configs" / "examples").glob("clip_*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        data = yaml.safe_load(path.read_text())
        cls = ClipContinualConfig if "tasks" in data else ClipDistillConfig if "method" in data else ClipRunConfig
        load_config(cls, path)
