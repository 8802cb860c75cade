"""Every dense method against the student alone, on the offline scenes (segmentation mIoU, detection mAP).

    python benchmarks/dense_methods.py                              # both tasks, 3 seeds, the recipes as written
    python benchmarks/dense_methods.py --task segmentation --seeds 3 --jobs 2 \\
        --set data.options.train_size=1024 train.epochs=10           # a shorter budget for every student
    python benchmarks/dense_methods.py --report-only                # the table of the runs already done

Each row is a recipe of configs/dense/scenes/ (``seg_*.yaml``, ``det_*.yaml``): the student alone
(``*_student.yaml``), then each method with its recipe's options.  The teachers (``*_teacher.yaml``, and the
SegFormer teacher of TransKD) are trained once, at seed 0, where their run folder has no weights yet; every student
run is `kdzoo train` / `kdzoo teacher` in a process of its own (one torch thread each, ``--jobs`` at a time), at
seeds 0..n-1, so a killed benchmark resumes where it stopped (finished cells are kept).  Printed and written to
OUT/<task>/table.md: the last epoch's test score over the whole test split, mean +- std over the seeds, the
difference from the student alone, whether the mean beats the student alone by more than the two rows' standard
deviations together ("yes"), is above it but within them ("within noise") or is not ("no"), and wall seconds per run (one process: start-up, training, every epoch's evaluation);
OUT/<task>/predictions.png draws the seed-0 models of every row beside the ground truth.

The SegFormer rows (``transkd``, ``good_student``, ``segformer_student``) run only when named in ``--rows``:
SegFormer trained from scratch stays at the background on the scenes (see segformer_teacher.yaml), so on CPU they
show that the recipes run, not what the methods gain.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "dense" / "scenes"
PREFIX = {"segmentation": "seg", "detection": "det"}
SCORE = {"segmentation": ("test_miou", "mIoU"), "detection": ("test_map", "mAP")}
TRANSFORMER_ROWS = {"transkd", "good_student", "segformer_student"}  # SegFormer models: need kdzoo[lm]
TEACHER_OF = {"transkd": "segformer_teacher"}  # rows whose teacher is not <prefix>_teacher
BASELINES = {"student", "segformer_student"}  # rows of a student alone (no teacher)
# (row, score column, shown as, compared with): the first student's score against the seg:tiny student alone,
# except TransKD's SegFormer student and the SegFormer peer of good_student, against the SegFormer alone
COMPARED = {"transkd": [("transkd", None, "segformer_student")],
            "good_student": [("good_student: seg:tiny peer", None, "student"),
                             ("good_student: SegFormer peer", "_1", "segformer_student")]}


def recipe_rows(folder: Path, task: str) -> list[str]:
    """The row names of a task: "student" first, then every method recipe in name order."""
    prefix = PREFIX[task]
    names = sorted(p.stem[len(prefix) + 1:] for p in folder.glob(f"{prefix}_*.yaml"))
    baselines = [name for name in sorted(BASELINES) if name in names]
    return baselines + [name for name in names if name not in BASELINES and name != "teacher"]


def recipe_path(folder: Path, task: str, row: str) -> Path:
    return folder / f"{PREFIX[task]}_{row}.yaml"


def command(path: Path, overrides: list[str]) -> list[str]:
    """`kdzoo teacher` for a single-model recipe, `kdzoo train` for a distillation one."""
    verb = "teacher" if "model" in yaml.safe_load(path.read_text()) else "train"
    return [sys.executable, "-c", "import sys; from kdzoo.cli import main; sys.exit(main())", verb, str(path),
            *overrides, "train.progress=false"]


def run_cell(path: Path, out: Path, name: str, overrides: list[str], threads: int) -> float:
    """One training run into out/name (skipped where it finished before); its wall seconds (0 when skipped).
    out/name.seconds is written once the process has exited cleanly: the mark of a finished run."""
    if finished(out, name):
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = command(path, [*overrides, f"output_dir={out}", f"name={name}"])
    log = out / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as stream:
        done = subprocess.run(args, stdout=stream, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name}: kdzoo exited {done.returncode}; see {log}")
    seconds = time.perf_counter() - started
    (out / f"{name}.seconds").write_text(f"{seconds:.1f}\n")  # the whole run: start-up, training, evaluation
    return seconds


def finished(out: Path, name: str) -> bool:
    return (out / f"{name}.seconds").is_file()


def last_score(run_dir: Path, key: str) -> float:
    with open(run_dir / "metrics.csv") as stream:
        rows = [row for row in csv.DictReader(stream) if row.get(key)]
    return float(rows[-1][key])


def teacher_runs(folder: Path, task: str, rows: list[str]) -> list[Path]:
    """The teacher recipes the rows need (each trained once, where it writes its weights)."""
    names = {TEACHER_OF.get(row, f"{PREFIX[task]}_teacher") for row in rows
             if row not in BASELINES and row != "good_student"}  # peers learn without a teacher
    return [folder / f"{name}.yaml" for name in sorted(names)]


def ensure_teacher(path: Path, threads: int) -> Path:
    """Train a teacher recipe into its own output folder unless its weights are there; its run folder."""
    config = yaml.safe_load(path.read_text())
    run_dir = Path(config["output_dir"]) / config["name"]
    if not (run_dir / "model.safetensors").is_file():  # exported when a teacher run ends (also by hand)
        print(f"training the teacher {path.name} -> {run_dir} (once)", flush=True)
        run_cell(path, run_dir.parent, run_dir.name, [], max(threads, 2))
    return run_dir


def verdict(delta: float, spread: float) -> str:
    if delta > spread:
        return "yes"
    return "within noise" if delta > 0 else "no"


def scores_of(out: Path, row: str, seeds: int, column: str) -> tuple[list[float], list[float]]:
    """A row's last-epoch scores and seconds over the seeds it has finished."""
    done = [out / f"{row}_s{seed}" for seed in range(seeds) if finished(out, f"{row}_s{seed}")]
    return ([last_score(run, column) for run in done],
            [float((out / f"{run.name}.seconds").read_text()) for run in done])


def table(task: str, rows: list[str], out: Path, seeds: int, teachers: dict[str, float]) -> str:
    key, label = SCORE[task]
    if not any(finished(out, f"{row}_s0") for row in rows):
        return f"{task}: no runs yet in {out}"
    lines = [f"### {task} on the offline scenes ({label} %, last epoch, whole test split; "
             f"mean +- std over {seeds} seeds)", ""]
    lines += [f"teacher {name}: {value:.2f}" for name, value in teachers.items()] + [""]
    lines += [f"| row | {label} | vs alone | beats alone? | s/run |", "|---|---|---|---|---|"]
    alone = {row: scores_of(out, row, seeds, key)[0] for row in BASELINES if row in rows}
    for row in rows:
        for shown_as, suffix, baseline in COMPARED.get(row, [(row, None, "student")]):
            scores, seconds = scores_of(out, row, seeds, key + (suffix or ""))
            if not scores:
                continue
            mean, std = statistics.mean(scores), statistics.pstdev(scores)
            shown = f"{mean:.2f} +- {std:.2f}" + (f" ({len(scores)} seeds)" if len(scores) != seeds else "")
            wall = f"{statistics.mean(seconds):.0f}" if seconds else "-"
            if row in BASELINES:
                lines.append(f"| {row.replace('_', ' ')} alone | {shown} | - | - | {wall} |")
                continue
            reference = alone.get(baseline) or []
            if not reference:
                lines.append(f"| {shown_as} | {shown} | - | - | {wall} |")
                continue
            delta = mean - statistics.mean(reference)
            spread = std + statistics.pstdev(reference)
            lines.append(f"| {shown_as} (vs {baseline.replace('_', ' ')}) | {shown} | {delta:+.2f} | "
                         f"{verdict(delta, spread)} | {wall} |" if baseline != "student" else
                         f"| {shown_as} | {shown} | {delta:+.2f} | {verdict(delta, spread)} | {wall} |")
    return "\n".join(lines)


def pictures(task: str, rows: list[str], out: Path, teacher_dirs: list[Path]) -> None:
    """Seed 0 of every row beside the ground truth and the teacher: out/predictions.png."""
    from kdzoo.runner import load_target
    from kdzoo.tasks.dense import plot_predictions

    models = {}
    for teacher_dir in teacher_dirs[:1]:
        loaded = load_target(teacher_dir, device="cpu")
        models["teacher"], data = loaded.model, loaded.data
    for row in rows:
        run_dir = out / f"{row}_s0"
        if finished(out, run_dir.name):
            peers_first = run_dir / "student_0.safetensors"  # a peer run: its first student (the CNN)
            loaded = load_target(peers_first if peers_first.is_file() else run_dir, device="cpu")
            models[f"{row} alone".replace("student alone", "alone") if row in BASELINES else row] = loaded.model
            data = loaded.data
    if models:
        plot_predictions(models, data, out / "predictions.png", title=f"{task}: seed 0 of every row", count=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", choices=list(PREFIX), default=list(PREFIX))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", nargs="+", help="recipe names to run (default: every one of the task)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every student run (e.g. train.epochs=10); teachers keep their recipe")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/dense"))
    parser.add_argument("--recipes", type=Path, default=RECIPES,
                        help="folder of seg_*.yaml / det_*.yaml recipes (default configs/dense/scenes)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of the runs already done")
    args = parser.parse_args()

    try:
        import transformers  # noqa: F401
        has_transformers = True
    except ImportError:
        has_transformers = False
    for task in args.task:
        wanted = set(args.rows or []) | {"student"} | {baseline for row in args.rows or []
                                                     for _, _, baseline in COMPARED.get(row, [])}
        rows = [row for row in recipe_rows(args.recipes, task)
                if (row in wanted if args.rows else row not in TRANSFORMER_ROWS)]
        if not has_transformers:
            skipped = [row for row in rows if row in TRANSFORMER_ROWS]
            rows = [row for row in rows if row not in TRANSFORMER_ROWS]
            if skipped:
                print(f"{task}: without transformers (pip install 'kdzoo[lm]') these rows are left out: {skipped}")
        out = args.out / task
        out.mkdir(parents=True, exist_ok=True)
        teacher_dirs = [ensure_teacher(path, args.threads) if not args.report_only else
                        Path(yaml.safe_load(path.read_text())["output_dir"]) / path.stem
                        for path in teacher_runs(args.recipes, task, rows)]
        if not args.report_only:
            cells = [(row, seed) for seed in range(args.seeds) for row in rows]
            with ThreadPoolExecutor(args.jobs) as pool:
                for (row, seed), _ in zip(cells, pool.map(lambda cell: run_cell(
                        recipe_path(args.recipes, task, cell[0]), out, f"{cell[0]}_s{cell[1]}",
                        [*args.set, f"train.seed={cell[1]}"], args.threads), cells)):
                    print(f"{task}: {row} seed {seed} done", flush=True)
        key = SCORE[task][0]
        teachers = {path.name: last_score(path, key) for path in teacher_dirs if (path / "metrics.csv").is_file()}
        text = table(task, rows, out, args.seeds, teachers)
        (out / "table.md").write_text(text + "\n")
        print(text, flush=True)
        if not args.report_only:
            pictures(task, rows, out, [path for path in teacher_dirs if path.name.endswith("_teacher")])
            print(f"pictures: {out / 'predictions.png'}")


if __name__ == "__main__":
    main()
