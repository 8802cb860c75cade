"""kdzoo lm under torchrun on the CPU (gloo): DDP follows the one-process trajectory; FSDP2 trains and exports."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 64}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _config(tmp_path, name, parallel):
    data = {"model": {"arch": "llama", "options": LLAMA}, "teacher": {"arch": "llama", "options": LLAMA},
            "losses": ["forward_kl"], "tokenizer": {"name": "byte"},
            "data": {"corpus": "pydoc", "seq_len": 16, "max_chars": 4000},
            "train": {"steps": 3, "batch_size": 8, "grad_accum": 2, "eval_every": 3, "save_every": 3,
                      "eval_batches": 1, "device": "cpu", "progress": False, "parallel": parallel,
                      "max_grad_norm": 0.0},
            "output_dir": str(tmp_path / "runs"), "name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("parallel", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_torchrun_matches_one_process(tmp_path, parallel):
    from kdzoo.engine.checkpoint import load_checkpoint

    _run([sys.executable, "-m", "kdzoo", "lm", "distill", _config(tmp_path, "one", parallel)])
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
                "kdzoo", "lm", "distill", _config(tmp_path, "two", parallel)])
    if parallel == "fsdp":  # the teacher is sharded like the student, not replicated: each process holds half
        line = next(x for x in out.splitlines() if x.startswith("fsdp: "))
        for part in line[len("fsdp: "):].split(", "):
            here, total = (int(v.replace(",", "")) for v in part.split()[1:4:2])
            assert here < 0.6 * total, line
    one = load_checkpoint(tmp_path / "runs" / "one" / "checkpoint.pt")["trainable"]
    two = load_checkpoint(tmp_path / "runs" / "two" / "checkpoint.pt")["trainable"]
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
    assert (tmp_path / "runs" / "two" / "model" / "config.json").is_file()
