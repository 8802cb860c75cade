"""The offline top-k teacher cache: bytes per token against dense logits, and how far each sparse loss (top-k
with the tail mass as one outcome) is from the dense loss on the same batch.

    python benchmarks/lm_topk_cache.py                       # uses runs/lm/teacher_cpu and student_alone_cpu_s0
    python benchmarks/lm_topk_cache.py --top-k 8 32 128 --temperature 1

Run from the repository root after benchmarks/lm_distill_table.py (the teacher and a trained student).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top-k", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=32, help="training rows in the compared batch")
    parser.add_argument("--student", default="runs/lm/student_alone_cpu_s0")
    args = parser.parse_args()
    from kdzoo.config import load_config
    from kdzoo.tasks.lm import losses as L
    from kdzoo.tasks.lm.cache import open_cache
    from kdzoo.tasks.lm.config import LMRunConfig
    from kdzoo.tasks.lm.data import loss_mask
    from kdzoo.tasks.lm.models import load_trained
    from kdzoo.tasks.lm.train import load_data

    cfg = load_config(LMRunConfig, "configs/lm/teacher_cpu.yaml")
    data = load_data(cfg, Path("runs/lm/teacher_cpu"))
    teacher, tokenizer = load_trained("runs/lm/teacher_cpu", data.tokenizer)
    student, _ = load_trained(args.student, tokenizer)
    vocab = teacher.config.vocab_size
    rows = torch.arange(args.rows)
    batch = data.train.select(rows)
    mask = loss_mask(batch.attention_mask)
    T = args.temperature
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch.input_ids).logits
        student_logits = student(input_ids=batch.input_ids).logits
    dense = {"forward_kl": L.forward_kl_loss(student_logits, teacher_logits, mask, T),
             "reverse_kl": L.reverse_kl_loss(student_logits, teacher_logits, mask, T),
             "jsd": L.generalized_jsd_loss(student_logits, teacher_logits, mask, 0.5, T),
             "tvd": L.total_variation_loss(student_logits, teacher_logits, mask, T)}
    sparse_fns = {"forward_kl": L.sparse_forward_kl_loss, "reverse_kl": L.sparse_reverse_kl_loss,
                  "jsd": L.sparse_generalized_jsd_loss, "tvd": L.sparse_total_variation_loss}
    tail = (teacher_logits / T).softmax(-1)
    print(f"teacher runs/lm/teacher_cpu, vocabulary {vocab}; student {args.student}; {args.rows} rows x "
          f"{batch.input_ids.shape[1]} tokens; T={T}; dense float32 logits: {vocab * 4} bytes/token\n")
    print("| top-k | bytes/token | disk bytes/token | mean teacher tail mass | " +
          " | ".join(f"{n} sparse / dense" for n in dense) + " |")
    print("|---" * (4 + len(dense)) + "|")
    for k in args.top_k:
        with tempfile.TemporaryDirectory() as tmp:
            cache = open_cache(teacher, data.train, vocab, k, T, shard_size=256, directory=tmp)
            cache.capture(teacher, data.train, batch_size=32, progress=False)
            tokens = int(data.train.attention_mask.sum())
            sparse = cache.lookup(rows)
            values = []
            for name, fn in sparse_fns.items():
                extra = {"beta": 0.5} if name == "jsd" else {}
                got = fn(student_logits, sparse.indices, sparse.logits, sparse.logsumexp, mask, temperature=T, **extra)
                values.append(f"{got.item():.4f} / {dense[name].item():.4f}")
            tail_mass = 1 - tail.topk(k, -1).values.sum(-1)[mask].mean().item()
            print(f"| {k} | {cache.bytes_per_token} | {cache.disk_bytes() / tokens:.1f} | {tail_mass:.4f} | "
                  + " | ".join(values) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
