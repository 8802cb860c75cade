"""The chunked LM losses on a CUDA GPU: exactness (chunked and Liger against unchunked, float32 and bf16 autocast),
then peak memory and tokens/s of one distillation step at real vocabulary sizes, unchunked vs chunked vs Liger's
fused linear JSD, and one `kdzoo lm distill` run end to end on the GPU.

    python benchmarks/lm_gpu_check.py                       # vocab 128256 and 262144, batch 4 x 1024 tokens
    python benchmarks/lm_gpu_check.py --vocab 128256 --steps 3

Liger is used when `liger-kernel` is installed (pip install liger-kernel); its rows are skipped otherwise.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STUDENT = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
           "num_key_value_heads": 16}
TEACHER = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16,
           "num_key_value_heads": 16}


def _llama(vocab: int, options: dict, seed: int, device):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, **options)
    return transformers.LlamaForCausalLM(config).to(device)


def _step_module(student, name: str, options: dict, chunk: int, liger: bool):
    from kdzoo.tasks.lm import create_lm_loss
    from kdzoo.tasks.lm.task import StudentStep

    step = StudentStep(student, {name: create_lm_loss(name, **options)}, 0.0, chunk)
    step.liger = liger
    return step


def _losses_and_grads(step, teacher, ids, amp: bool, collect: bool = True):
    from kdzoo.tasks.lm.data import loss_mask
    from kdzoo.tasks.lm.task import teacher_outputs

    attention = torch.ones_like(ids, dtype=torch.bool)
    step.student.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
        parts = teacher_outputs(teacher, ids, attention, False, False, [], chunked=bool(step.chunk_tokens))
        losses = step(ids, attention, loss_mask(attention), parts)
    total = sum(losses.values())
    total.backward()
    if not collect:
        return float(total.detach()), None
    grads = torch.cat([p.grad.float().flatten() for p in step.student.parameters() if p.grad is not None])
    return float(total.detach()), grads


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def exactness(liger: bool, device) -> None:
    vocab = 4096
    student = _llama(vocab, {**STUDENT, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 4}, 0, device)
    teacher = _llama(vocab, {**TEACHER, "hidden_size": 384, "intermediate_size": 768, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 4}, 1, device).eval()
    teacher.requires_grad_(False)
    ids = torch.randint(0, vocab, (4, 256), device=device, generator=torch.Generator(device).manual_seed(2))
    print("exactness (loss relative difference, gradient relative L2 difference) against the unchunked path")
    print(f"{'loss':<32} {'amp':<5} {'path':<8} {'loss':>12} {'d loss':>10} {'d grad':>10}")
    cases = [("forward_kl", {}), ("reverse_kl", {"temperature": 2.0}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.0})]
    for name, options in cases:
        for amp in (False, True):
            ref_loss, ref_grad = _losses_and_grads(_step_module(student, name, options, 0, False), teacher, ids, amp)
            paths = [("chunked", 128, False)] + ([("liger", 128, True)] if liger else [])
            for label, chunk, use_liger in paths:
                loss, grad = _losses_and_grads(_step_module(student, name, options, chunk, use_liger), teacher, ids,
                                               amp)
                d_loss = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
                d_grad = float((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
                print(f"{name + str(options or ''):<32} {'bf16' if amp else 'fp32':<5} {label:<8} {loss:>12.6f} "
                      f"{d_loss:>10.2e} {d_grad:>10.2e}", flush=True)


def memory_and_speed(vocab: int, batch: int, seq: int, steps: int, liger: bool, device) -> None:
    from kdzoo.tasks.lm.chunked import auto_chunk_tokens

    student = _llama(vocab, STUDENT, 0, device)
    teacher = _llama(vocab, TEACHER, 1, device).eval().requires_grad_(False)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(3))
    chunk = auto_chunk_tokens(vocab)
    paths = [("unchunked", 0, False), (f"chunked {chunk}", chunk, False)] + ([("liger", chunk, True)] if liger else [])
    initial = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    for label, chunk_tokens, use_liger in paths:
        student.load_state_dict(initial)  # every path starts from the same weights: the same step-1 loss
        step = _step_module(student, "jsd", {"beta": 0.0}, chunk_tokens, use_liger)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            times, loss, first_loss = [], float("nan"), float("nan")
            for i in range(steps + 1):
                _sync(device)
                start = time.perf_counter()
                loss, _ = _losses_and_grads(step, teacher, ids, True, collect=False)
                if i == 0:
                    first_loss = loss
                optimizer.step()
                _sync(device)
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
            rate = batch * seq / (sum(times[1:]) / steps)
            loss = first_loss
            print(f"{vocab:>7} {label:<14} {loss:>12.6f} {peak:>10.2f} {rate:>10.0f}", flush=True)
        except torch.OutOfMemoryError:
            print(f"{vocab:>7} {label:<14} {'out of memory':>34}", flush=True)
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        student.zero_grad(set_to_none=True)
    del student, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cli_run() -> None:
    """`kdzoo lm distill` on the GPU (bf16 autocast, chunked, Liger when installed), a few steps."""
    import yaml

    with tempfile.TemporaryDirectory() as root:
        small = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 32000}
        config = {"model": {"arch": "llama", "options": small}, "teacher": {"arch": "llama", "options": small},
                  "tokenizer": {"name": "byte"}, "losses": [{"name": "jsd", "options": {"beta": 0.0}}],
                  "data": {"corpus": "pydoc", "seq_len": 256, "max_chars": 200000},
                  "train": {"steps": 20, "batch_size": 16, "eval_every": 20, "save_every": 20, "device": "cuda",
                            "amp": "bf16", "progress": False, "chunk_tokens": 256}, "output_dir": root}
        path = Path(root) / "gpu.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "kdzoo", "lm", "distill", str(path)], capture_output=True,
                              text=True)
        print("kdzoo lm distill on cuda:", "ok" if done.returncode == 0 else f"FAILED ({done.returncode})")
        print("\n".join((done.stdout + done.stderr).strip().splitlines()[-4:]), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256, 262144])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu for a dry run of the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from kdzoo.tasks.lm.chunked import liger_available

    liger = liger_available(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, Liger-Kernel {'used' if liger else 'not installed or no CUDA'}",
          flush=True)
    exactness(liger, device)
    print(f"\none distillation step (GKD JSD beta 0 = forward KL, bf16 autocast, AdamW), batch {args.batch_size} x "
          f"{args.seq_len} tokens; student 4x1024, teacher 8x2048")
    print(f"{'vocab':>7} {'path':<14} {'step-1 loss':>12} {'peak GiB':>10} {'tok/s':>10}", flush=True)
    for vocab in args.vocab:
        memory_and_speed(vocab, args.batch_size, args.seq_len, args.steps, liger, device)
    if device.type == "cuda":
        cli_run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
