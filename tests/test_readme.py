"""The README's Python example runs as written."""
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "student top-1" in done.stdout and "KD of one batch" in done.stdout
    assert "## fitnet (weight 100)" in done.stdout and "- teacher: TinyCNN, test top-1 " in done.stdout
    run = tmp_path / "runs" / "readme"
    for name in ("checkpoint.pt", "metrics.csv", "student.safetensors", "summary.json", "curves.png",
                 "train.yaml", "plan.md"):
        assert (run / name).is_file(), name
