"""kdzoo vs TRL's GKDTrainer on the same distillation step, side by side on the CPU.

Same random Llama teacher and student (built from configs with one seed), same token rows (random ids, one
seed), same loss (GKD's generalized JSD at beta 0 = forward KL(teacher || student), temperature 1, no
on-policy generation: lmbda 0), same AdamW (lr, betas, weight decay, clipping, constant schedule).  Each
configuration runs in its own process with 2 threads, in the order kdzoo chunked, kdzoo unchunked, TRL,
repeated (alternated) `--repeats` times.  Printed per vocabulary size: the step-1 loss of each, tokens/s over
the steps after the first (median over repeats), and two peaks of resident memory (max over repeats): over the
training steps (the high-water mark reset just before the first step: models, optimizer state and the step's
tensors) and over the whole process (imports, building, export too).

    python benchmarks/lm_side_by_side.py                        # vocab 32000 and 128000, seq 256, batch 4
    python benchmarks/lm_side_by_side.py --vocab 32000 --steps 4 --repeats 1

Needs `pip install trl` (TRL's GKDTrainer lives in trl.experimental.gkd).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEACHER = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 4}
STUDENT = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4}
LR, BETAS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 0.01, 1.0


def _models(vocab: int, seq_len: int, seed: int):
    import torch
    import transformers

    models = []
    for i, options in enumerate((TEACHER, STUDENT)):
        torch.manual_seed(seed + i)
        config = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=seq_len, bos_token_id=0,
                                          eos_token_id=0, pad_token_id=0, **options)
        models.append(transformers.LlamaForCausalLM(config))
    teacher, student = models
    return teacher.eval().requires_grad_(False), student


def _rows(vocab: int, seq_len: int, count: int, seed: int):
    import torch

    return torch.randint(1, vocab, (count, seq_len), generator=torch.Generator().manual_seed(seed + 100))


def _peak_rss_mib() -> float:
    """The process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_steps_peak() -> None:
    """Start a new resident-memory high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def _steps_peak_mib() -> float:
    """The resident-memory high-water mark since `_reset_steps_peak` (MiB): the training steps' peak, without
    what came before (imports, model building) beyond what they still hold, or after (export, checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_kdzoo(args, chunked: bool) -> dict:
    import torch

    from kdzoo.engine.trainer import Run, Trainer
    from kdzoo.tasks.lm.config import LMModelConfig, LMRunConfig, LMTrainConfig
    from kdzoo.config import MethodConfig
    from kdzoo.tasks.lm.data import LMData, TokenRows
    from kdzoo.tasks.lm.task import LMTask, loop_config

    teacher, student = _models(args.vocab, args.seq_len, args.seed)
    ids = _rows(args.vocab, args.seq_len, args.batch_size * args.steps, args.seed)
    rows = TokenRows(ids, torch.ones_like(ids, dtype=torch.bool))
    train = LMTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=LR, betas=list(BETAS),
                          weight_decay=WEIGHT_DECAY, warmup_steps=0, schedule="constant", max_grad_norm=CLIP,
                          eval_every=args.steps, save_every=args.steps, eval_batches=1, device="cpu", amp="off",
                          progress=False, log_every=1, chunk_tokens=(args.chunk_tokens or None) if chunked else 0)
    cfg = LMRunConfig(model=LMModelConfig(arch="llama"), teacher=LMModelConfig(arch="llama"),
                      losses=[MethodConfig("jsd", {"beta": 0.0})], ce_weight=0.0, train=train,
                      output_dir=args.out)
    times, first_loss, peak = [], [], []

    class Timed(LMTask):
        def batches(self, trainer, epoch, first_step):
            _reset_steps_peak()
            for batch in super().batches(trainer, epoch, first_step):
                times.append(time.perf_counter())
                yield batch

        def evaluate(self, trainer, index):  # called right after the last step (eval_every = steps)
            times.append(time.perf_counter())
            peak.append(_steps_peak_mib())
            return super().evaluate(trainer, index)

        def setup(self, trainer):
            super().setup(trainer)
            forward = self.step_module.forward

            def recording(*a, **k):
                out = forward(*a, **k)
                if not first_loss:
                    first_loss.append(float(sum(v.detach() for v in out.values())))
                return out
            self.step_module.forward = recording

        def finish(self, trainer):  # nothing to export: only the steps are measured
            pass

    # batch_rows permutes the rows: give it exactly the rows in order by a one-pass dataset of steps*batch rows
    task = Timed(cfg, LMData(rows, rows.select(torch.arange(args.batch_size)), None), student, teacher)
    run_dir = Path(args.out) / f"kdzoo_{'chunked' if chunked else 'unchunked'}_{args.vocab}"
    trainer = Trainer(task, loop_config(cfg), [Run(run_dir=run_dir)], resume=False, verbose=False)
    trainer.run()
    steps = [b - a for a, b in zip(times, times[1:])]
    return {"loss1": first_loss[0], "seconds": steps, "chunk_tokens": task.chunk_tokens, "steps_peak_mib": peak[0]}


def run_trl(args) -> dict:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from tokenizers import Tokenizer, models
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student = _models(args.vocab, args.seq_len, args.seed)
    ids = _rows(args.vocab, args.seq_len, args.batch_size * args.steps, args.seed)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="<pad>")
    # labels: the first column is never predicted, so -100 there counts the same positions as kdzoo's mask
    labels = ids.clone()
    labels[:, 0] = -100
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})

    def collate(items):
        batch = torch.tensor([item["input_ids"] for item in items])
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch),
                "labels": torch.tensor([item["labels"] for item in items]), "prompts": batch[:, :1],
                "prompt_attention_mask": torch.ones_like(batch[:, :1])}

    times, first_loss, peak = [], [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            _reset_steps_peak()

        def on_step_begin(self, a, state, control, **kw):
            times.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter())
            if state.global_step == args.steps:
                peak.append(_steps_peak_mib())

    class Recording(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not first_loss:
                first_loss.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    config = GKDConfig(output_dir=str(Path(args.out) / f"trl_{args.vocab}"), per_device_train_batch_size=args.batch_size,
                       max_steps=args.steps, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                       weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP, lr_scheduler_type="constant", warmup_steps=0,
                       lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, use_cpu=True, report_to=[],
                       logging_steps=1000, save_strategy="no", dataloader_num_workers=0, seed=args.seed,
                       disable_tqdm=True, max_length=args.seq_len, bf16=False, fp16=False)
    trainer = Recording(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                        data_collator=collate, processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    steps = [times[i + 1] - times[i] for i in range(0, len(times) - 1, 2)]
    return {"loss1": first_loss[0], "seconds": steps, "steps_peak_mib": peak[0]}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_trl(args) if args.worker == "trl" else run_kdzoo(args, args.worker == "kdzoo")
    result["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


KINDS = [("kdzoo", "kdzoo chunked"), ("kdzoo_unchunked", "kdzoo unchunked"), ("trl", "TRL GKDTrainer")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated repetitions of each configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-tokens", type=int, default=0, help="kdzoo's chunk size (default 0: its automatic one)")
    parser.add_argument("--out", default="runs/lm_side_by_side")
    parser.add_argument("--worker", choices=[k for k, _ in KINDS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.vocab = args.vocab[0]
        worker(args)
        return 0
    print(f"seq {args.seq_len}, batch {args.batch_size}, {args.steps} steps ({args.steps - 1} timed), "
          f"{args.threads} threads, {args.repeats} alternated repeats; teacher {TEACHER['num_hidden_layers']}x"
          f"{TEACHER['hidden_size']}, student {STUDENT['num_hidden_layers']}x{STUDENT['hidden_size']}", flush=True)
    print(f"{'vocab':>7} {'run':<16} {'step-1 loss':>12} {'tok/s':>8} {'steps peak MiB':>14} {'process peak MiB':>16}"
          "   chunk", flush=True)
    for vocab in args.vocab:
        results: dict[str, list[dict]] = {k: [] for k, _ in KINDS}
        for _ in range(args.repeats):
            for kind, _ in KINDS:
                command = [sys.executable, __file__, "--worker", kind, "--vocab", str(vocab), "--seq-len",
                           str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                           "--threads", str(args.threads), "--seed", str(args.seed), "--out", args.out,
                           "--chunk-tokens", str(args.chunk_tokens)]
                done = subprocess.run(command, capture_output=True, text=True)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not line:
                    print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"{kind} at vocab {vocab} failed")
                results[kind].append(json.loads(line[0][7:]))
        tokens = args.batch_size * args.seq_len
        summary = {}
        for kind, label in KINDS:
            rates = [tokens / statistics.median(r["seconds"][1:]) for r in results[kind]]
            summary[kind] = (statistics.median(rates), max(r["steps_peak_mib"] for r in results[kind]),
                             max(r["peak_rss_mib"] for r in results[kind]))
            chunk = results[kind][0].get("chunk_tokens", "")
            print(f"{vocab:>7} {label:<16} {results[kind][0]['loss1']:>12.7f} {summary[kind][0]:>8.0f} "
                  f"{summary[kind][1]:>14.0f} {summary[kind][2]:>16.0f}   {chunk}", flush=True)
        loss_gap = abs(results["kdzoo"][0]["loss1"] - results["trl"][0]["loss1"])
        ratio = lambda a, b, i: summary[a][i] / summary[b][i]  # noqa: E731
        print(f"{vocab:>7} kdzoo chunked / TRL: speed {ratio('kdzoo', 'trl', 0):.2f}x, steps' peak memory "
              f"{ratio('kdzoo', 'trl', 1):.2f}x (vs own unchunked {ratio('kdzoo', 'kdzoo_unchunked', 1):.2f}x), process "
              f"peak {ratio('kdzoo', 'trl', 2):.2f}x (vs own unchunked {ratio('kdzoo', 'kdzoo_unchunked', 2):.2f}x), "
              f"step-1 loss gap {loss_gap:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
