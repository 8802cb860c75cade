"""The offline teacher cache, top-k against random sampling (Anshumann et al. 2025): bytes per token against dense
logits, how far each sparse loss is from the dense loss on the same batch, and how well the forward KL's gradient
with respect to the student's logits is kept (cosine to the dense gradient; the sampled cache's is unbiased, its
single-cache cosine shows the noise).  A sampled loss's value is not an estimate of the dense one (its
sum p_hat log p_hat term is biased upward: a few draws look more certain than the teacher); only its gradient is
unbiased.

    python benchmarks/lm_topk_cache.py                       # uses runs/lm/teacher_cpu and student_alone_cpu_s0
    python benchmarks/lm_topk_cache.py --top-k 8 32 128 --samples 12 50 --temperature 1

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
    parser.add_argument("--samples", type=int, nargs="*", default=[12, 50], help="draws per position (mode sample)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=32, help="training rows in the compared batch")
    parser.add_argument("--config", default="configs/lm/teacher_cpu.yaml", help="the teacher's training config")
    parser.add_argument("--teacher", default="runs/lm/teacher_cpu")
    parser.add_argument("--student", default="runs/lm/student_alone_cpu_s0")
    args = parser.parse_args()
    from kdzoo.config import load_config
    from kdzoo.tasks.lm import losses as L
    from kdzoo.tasks.lm.cache import open_offline_cache
    from kdzoo.tasks.lm.config import LMRunConfig, OfflineConfig
    from kdzoo.tasks.lm.data import loss_mask
    from kdzoo.tasks.lm.models import load_trained
    from kdzoo.tasks.lm.sampled import sampled_kl_per_token
    from kdzoo.tasks.lm.task import load_data

    cfg = load_config(LMRunConfig, args.config)
    data = load_data(cfg, Path(args.teacher))
    teacher, tokenizer = load_trained(args.teacher, data.tokenizer)
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

    def gradient(loss_of) -> torch.Tensor:
        """d loss / d student logits at the distilled positions, flattened."""
        z = student_logits.detach().clone().requires_grad_(True)
        loss_of(z).backward()
        return z.grad[mask].reshape(-1)

    dense_grad = gradient(lambda z: L.forward_kl_loss(z, teacher_logits, mask, T))
    cosine = lambda g: torch.nn.functional.cosine_similarity(g, dense_grad, dim=0).item()  # noqa: E731
    tail = (teacher_logits / T).softmax(-1)
    tokens = int(data.train.attention_mask.sum())
    print(f"teacher {args.teacher}, vocabulary {vocab}; student {args.student}; {args.rows} rows x "
          f"{batch.input_ids.shape[1]} tokens; T={T}; dense float32 logits: {vocab * 4} bytes/token\n")
    print("| cache | tokens stored / position | bytes/token | disk bytes/token | mean teacher tail mass | "
          "forward-KL gradient cosine to dense | " + " | ".join(f"{n} sparse / dense" for n in dense) + " |")
    print("|---" * (6 + len(dense)) + "|")
    for k in args.top_k:
        with tempfile.TemporaryDirectory() as tmp:
            offline = OfflineConfig(enabled=True, mode="topk", top_k=k, temperature=T, cache_dir=tmp)
            cache = open_offline_cache(teacher, data.train, vocab, offline)
            cache.capture(teacher, data.train, batch_size=32, progress=False)
            sparse = cache.lookup(rows)
            values = []
            for name, fn in sparse_fns.items():
                extra = {"beta": 0.5} if name == "jsd" else {}
                got = fn(student_logits, sparse.indices, sparse.logits, sparse.logsumexp, mask, temperature=T, **extra)
                values.append(f"{got.item():.4f} / {dense[name].item():.4f}")
            grad = gradient(lambda z, s=sparse: L.sparse_forward_kl_loss(z, s.indices, s.logits, s.logsumexp, mask, T))
            tail_mass = 1 - tail.topk(k, -1).values.sum(-1)[mask].mean().item()
            print(f"| top-{k} | {k} | {cache.bytes_per_token} | {cache.disk_bytes() / tokens:.1f} | {tail_mass:.4f} | "
                  f"{cosine(grad):.4f} | " + " | ".join(values) + " |", flush=True)
    for n in args.samples:
        with tempfile.TemporaryDirectory() as tmp:
            offline = OfflineConfig(enabled=True, mode="sample", samples=n, temperature=T, cache_dir=tmp)
            cache = open_offline_cache(teacher, data.train, vocab, offline)
            cache.capture(teacher, data.train, batch_size=32, progress=False)
            sampled = cache.lookup(rows)
            flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731

            def sampled_loss(z, sampled=sampled, flat=flat):
                per_token = sampled_kl_per_token(flat(z), flat(sampled.indices), flat(sampled.weights), T)
                return L.masked_mean(per_token.view(mask.shape), mask)

            got = sampled_loss(student_logits)
            values = [f"{got.item():.4f} / {dense['forward_kl'].item():.4f}", "-", "-", "-"]
            print(f"| sample {n} | {cache.mean_distinct:.1f} | {cache.bytes_per_token:.1f} | "
                  f"{cache.disk_bytes() / tokens:.1f} | - | {cosine(gradient(sampled_loss)):.4f} | "
                  + " | ".join(values) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
