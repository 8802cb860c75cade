"""``PYTHONPATH=src python -m tests.fault_injection [--quick] [--keep DIR]``: print the fault-injection table."""
import argparse
import sys
import tempfile
import time
from pathlib import Path

from .harness import FULL, format_table, run_all

QUICK = {"kills": 3, "condense_kills": 2, "lm_kills": 2, "files": 8, "nonfinite": FULL["nonfinite"][:2]}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_injection", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer cases per scenario")
    parser.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdzoo-faults-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run_all(workdir, QUICK if args.quick else FULL, log=lambda line: print(line, file=sys.stderr))
    print(format_table(rows))
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
