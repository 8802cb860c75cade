"""``PYTHONPATH=src python -m tests.fault_injection [--quick] [--keep DIR]``: print the whole fault-injection table:
kills, damaged files, malformed configs, NaN, full disks and dead ranks (harness.py), signals, two processes on a
folder, changed configs and replaced inputs on resume (lifecycle.py), and the bad inputs of every command
(bad_inputs_core.py, bad_inputs_domains.py) with the one-line message each gets (--messages)."""
import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import bad_inputs_core, lifecycle
from .harness import FULL, Reference, Row, format_table, run_all

try:
    from . import bad_inputs_domains
except ImportError:  # transformers/diffusers missing: the domain commands cannot run
    bad_inputs_domains = None

QUICK = {"kills": 3, "condense_kills": 2, "lm_kills": 2, "files": 8, "nonfinite": FULL["nonfinite"][:2]}


def lifecycle_rows(workdir: Path, log) -> list[Row]:
    workdir.mkdir(parents=True, exist_ok=True)
    ref, lm = Reference(workdir), lifecycle.LMReference(workdir)
    rows = []
    for make in (lambda: lifecycle.signals(workdir, ref, lm), lambda: lifecycle.two_processes(workdir, ref, lm),
                 lambda: lifecycle.changed_lm_resume(workdir, lm), lambda: lifecycle.replaced_inputs(workdir, ref, lm),
                 lambda: lifecycle.lm_nonfinite(workdir, lm), lambda: lifecycle.export_disk_full(workdir, ref, lm)):
        start = time.perf_counter()
        row = make()
        row.seconds = time.perf_counter() - start
        log(f"{row.scenario}: {row.passed}/{row.total} ({row.seconds:.1f}s)")
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_injection", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer cases per scenario")
    parser.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    parser.add_argument("--messages", action="store_true", help="also list every bad input with its message")
    args = parser.parse_args()
    start = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    found = {}
    with tempfile.TemporaryDirectory(prefix="kdzoo-faults-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run_all(workdir, QUICK if args.quick else FULL, log=log)
        rows += lifecycle_rows(workdir / "lifecycle", log)
        work = bad_inputs_core.work_directory()
        try:
            core, found = bad_inputs_core.core_results(work, log=lambda line: None)
        finally:
            bad_inputs_core.remove_work_directory(work)
        rows += core
        if bad_inputs_domains is not None:
            work = bad_inputs_core.work_directory()
            try:
                for command, (row, messages) in bad_inputs_domains.messages_by_command(work).items():
                    rows.append(row)
                    found[command] = messages
            finally:
                bad_inputs_core.remove_work_directory(work)
    print(format_table(rows))
    if args.messages:
        print(bad_inputs_core.format_messages(found))
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
