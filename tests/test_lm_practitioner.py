"""kdzoo lm runs the way practitioners need them: a student with another tokenizer than its teacher (ULD,
GOLD), LoRA students exported merged, frozen embeddings, the random-sampling offline cache."""
import json
import math

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from kdzoo.cli import main  # noqa: E402
from kdzoo.tasks.lm.models import load_trained  # noqa: E402

LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 128}
DATA = {"corpus": "pydoc", "seq_len": 24, "max_chars": 4000}
TRAIN = {"steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "eval_batches": 1, "device": "cpu",
         "warmup_steps": 0, "progress": False}


def _run(tmp_path, name, command="distill", **config):
    base = {"model": {"arch": "llama", "options": LLAMA}, "data": DATA, "train": TRAIN, "output_dir": str(tmp_path)}
    base.update(config)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    assert main(["lm", command, str(path)]) == 0
    return json.loads((tmp_path / name / "summary.json").read_text())["final"]


@pytest.fixture(scope="module")
def byte_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    _run(root, "teacher", "train", tokenizer={"name": "byte"})
    return root / "teacher"


@pytest.mark.parametrize("loss", ["uld", "gold"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_cross_tokenizer_student_distils_from_a_byte_teacher(tmp_path, byte_teacher, loss, chunk):
    """A BPE student from a byte-level teacher: the teacher re-tokenizes each row, positions pair by offsets."""
    final = _run(tmp_path, f"x_{loss}", tokenizer={"name": "bpe", "vocab_size": 400},
                 teacher={"name": str(byte_teacher)}, losses=[loss], train=dict(TRAIN, chunk_tokens=chunk))
    assert math.isfinite(final["train_loss"]) and "val_kl" not in final  # no KL across vocabularies


def test_cross_tokenizer_losses_match_chunked_and_not(byte_teacher, tmp_path):
    finals = [_run(tmp_path, f"c{chunk}", tokenizer={"name": "bpe", "vocab_size": 400},
                   teacher={"name": str(byte_teacher)}, losses=["gold"], train=dict(TRAIN, chunk_tokens=chunk))
              for chunk in (0, 5)]
    assert math.isclose(finals[0]["train_loss"], finals[1]["train_loss"], rel_tol=1e-4)
    assert math.isclose(finals[0]["val_ppl"], finals[1]["val_ppl"], rel_tol=1e-4)


def test_lora_student_trains_adapters_only_and_exports_merged_weights(tmp_path, byte_teacher):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    _run(tmp_path, "lora", model={"name": str(byte_teacher / "model"), "lora": lora}, teacher={"name": str(byte_teacher)},
         losses=["forward_kl"], tokenizer={"name": str(byte_teacher)})
    run = tmp_path / "lora"
    assert (run / "adapter" / "adapter_config.json").is_file()
    merged, tokenizer = load_trained(run)
    base, _ = load_trained(byte_teacher)
    adapted = peft.PeftModel.from_pretrained(load_trained(byte_teacher)[0], str(run / "adapter"))
    ids = torch.tensor([tokenizer.encode("def f(x): return x")])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)  # only the adapted weights moved


def test_frozen_embeddings_stay_as_loaded(tmp_path, byte_teacher):
    _run(tmp_path, "frozen", model={"name": str(byte_teacher / "model"), "freeze_embeddings": True},
         teacher={"name": str(byte_teacher)}, losses=["forward_kl"], tokenizer={"name": str(byte_teacher)})
    student, base = load_trained(tmp_path / "frozen")[0], load_trained(byte_teacher)[0]
    assert torch.equal(student.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(student.lm_head.weight, base.lm_head.weight)


def test_sampled_offline_cache_trains_forward_kl_and_is_checked(tmp_path, byte_teacher, capsys):
    final = _run(tmp_path, "sampled", teacher={"name": str(byte_teacher)}, losses=["forward_kl"],
                 tokenizer={"name": str(byte_teacher)},
                 offline={"enabled": True, "mode": "sample", "samples": 16})
    assert math.isfinite(final["train_loss"])
    bad = {"model": {"arch": "llama", "options": LLAMA}, "teacher": {"name": str(byte_teacher)},
           "losses": ["reverse_kl"], "offline": {"enabled": True, "mode": "sample"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["lm", "distill", str(tmp_path / "bad.yaml")]) == 2
    assert "forward KL only" in capsys.readouterr().err


@pytest.mark.parametrize("section,message", [
    ({"model": {"arch": "llama", "lora": {"alfa": 4}}}, "did you mean 'alpha'"),
    ({"teacher": {"endpoint": "http://127.0.0.1:9", "model": "m"}, "losses": ["forward_kl"]}, "tokenizer.name"),
    ({"teacher": {"endpoint": "http://127.0.0.1:9", "name": "x", "model": "m"}}, "not both"),
    ({"teacher": {"arch": "llama", "lora": {"r": 2}}, "losses": ["forward_kl"]}, "only the trained model"),
])
def test_bad_student_and_served_sections_are_one_line_errors(tmp_path, section, message, capsys):
    config = {"model": {"arch": "llama", "options": LLAMA}, "data": DATA, "train": TRAIN, "output_dir": str(tmp_path)}
    config.update(section)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["lm", "distill" if "teacher" in section else "train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
