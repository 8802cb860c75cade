"""A language-model or tokenizer folder that ships its own Python code (transformers' ``auto_map``) is refused in one
line, without a prompt, and its code never runs -- even with "y" waiting on standard input (issue 28)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
LOADER = """
import sys
from kdzoo.errors import ConfigError
from kdzoo.tasks.lm.models import build_model, load_tokenizer, train_tokenizer
try:
    if sys.argv[1] == "model":
        build_model(None, sys.argv[2], {}, train_tokenizer(["hello world"], "byte"))
    else:
        load_tokenizer(sys.argv[2])
except ConfigError as err:
    print("ConfigError:", err)
"""


def _hostile_folder(root: Path, marker: Path) -> Path:
    folder = root / "hostile"
    folder.mkdir()
    code = f"open({str(marker)!r}, 'w').write('remote code ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    return folder


@pytest.mark.parametrize("what", ["model", "tokenizer"])
def test_a_folder_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path, what):
    marker = tmp_path / "RAN"
    folder = _hostile_folder(tmp_path, marker)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOADER, what, str(folder)], input="y\ny\n", capture_output=True,
                          text=True, env=env, timeout=300)
    out = done.stdout + done.stderr
    assert not marker.exists(), out
    assert "[y/N]" not in out and "Do you wish to run" not in out, out  # never asked
    assert "ConfigError" in out and "asks to run its own Python code" in out and "never runs remote code" in out, out
