"""Tokens/s and model-FLOPs utilisation (MFU) of tuneline's training loop on a Llama-shaped model,
against the bf16 matmul peak of the same device measured in the same run. Made for a GPU
(`scripts/gpu-check.sh` runs it there with `--shape 1b`); runs on a CPU too (`--shape 135m`).

The model has random weights built from a config (nothing is downloaded): `1b` is Llama-3.2-1B's
shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256), `135m` SmolLM2-135M's.
The rows are random tokens: `--seq` tokens each, the last `--answer` of them the answer (the loss
is on those only, as tuneline trains). The step is tuneline's own `train()` (LoRA r=16 on every
linear layer, the fused LoRA path, bf16 autocast where the device has it, AdamW), timed after
`--warmup` steps.

    MFU = F · tokens/s / peak, with per token (printed with the run's numbers)
    F = 4·N + 6·L·d·S/2 + 4·d·V·a
      4·N        N = the frozen non-embedding weights: forward 2N, backward through them 2N (a frozen
                 weight has no gradient of its own; the adapter's own is under 1% and not counted)
      6·L·d·S/2  attention scores and values over L layers, forward and backward, causal (a token
                 attends to S/2 positions on average)
      4·d·V·a    the head on answer tokens only (a = the answer share of the tokens): tuneline
                 computes no logits elsewhere

    python bench/train_mfu.py --shape 1b --steps 20 --batch 8 --seq 1024 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}


def matmul_peak(device: str, dtype) -> float:
    """The best FLOP/s of a square product of ``dtype`` on ``device`` (8192 on a GPU, 2048 on a CPU)."""
    import torch

    n = 8192 if device.startswith("cuda") else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    reps = 10 if device.startswith("cuda") else 3
    best = float("inf")
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _doctor_estimate(model, cfg, device: str, precision: str) -> int:
    """What `tuneline doctor` estimates one training step of ``cfg`` needs on this model (bytes)."""
    from tuneline.runtime import Compute
    from tuneline.train.doctor import estimate

    folder = Path(tempfile.mkdtemp())
    model.config.save_pretrained(folder)
    return estimate(folder, cfg, Compute.resolve(precision, cfg.method, device)).total_bytes


def _tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` ids: train() needs a pad id and saves the tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t0")))
    tok.pad_token, tok.eos_token = "t0", "t1"
    return tok


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneline.data.tokenize import IGNORE_INDEX, Encoded
    from tuneline.runtime import resolve_precision
    from tuneline.spec.models import TrainSpec
    from tuneline.train import TrainOptions, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed steps, profile N more and print the top operators")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile each decoder layer")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    device, precision = args.device, resolve_precision("auto", args.device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model is slow to initialise on a CPU
        model = LlamaForCausalLM(config).to(dtype=dtype)
    frozen = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    rng = random.Random(0)
    total = args.warmup + args.steps + args.profile
    rows = [Encoded([rng.randrange(2, config.vocab_size) for _ in range(args.seq)],
                    [IGNORE_INDEX] * (args.seq - args.answer) + [rng.randrange(2, config.vocab_size)
                                                                  for _ in range(args.answer)], f"row{i}")
            for i in range(total * args.batch)]
    cfg = TrainSpec(max_steps=total, batch_size=args.batch, seq_len=args.seq, precision=precision, lr=1e-4,
                    share_prefix=False, checkpoint_every=10**6, compile=args.compile)
    stamps: list[float] = []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                      + ([torch.profiler.ProfilerActivity.CUDA] if device.startswith("cuda") else []))

    def on_step(step: int, metrics: dict[str, float]) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        if args.profile and step == args.warmup + args.steps:  # the timed steps are done: profile the rest
            profiler.start()

    peak = matmul_peak(device, dtype)
    guess = _doctor_estimate(model, cfg, device, precision)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train(cfg, model, _tokenizer(config.vocab_size), [], Path(tempfile.mkdtemp()),
          TrainOptions(device=device, show_progress=False, on_step=on_step, encoded_train=(rows, [])))
    if args.profile:
        profiler.stop()
        stamps = stamps[:total - args.profile]
        by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=by, row_limit=25, max_name_column_width=60))
    seconds = stamps[-1] - stamps[args.warmup - 1] if args.warmup else stamps[-1] - stamps[0]
    timed_steps = args.steps if args.warmup else args.steps - 1
    tokens = timed_steps * args.batch * args.seq
    tps = tokens / seconds
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_token = 4 * frozen + 6 * layers * d * args.seq / 2 + 4 * d * vocab * args.answer / args.seq
    achieved = per_token * tps
    out = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "shape": args.shape,
           "precision": precision, "tokens_per_second": tps, "model_flops_per_token": per_token,
           "achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12, "mfu": achieved / peak,
           "batch": args.batch, "seq": args.seq, "answer": args.answer, "steps_timed": timed_steps,
           "compile": args.compile, "doctor_estimate_bytes": guess,
           "peak_allocated_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None}
    print(f"{out['device']}, {args.shape} Llama shape{' (compiled layers)' if args.compile else ''} ({frozen / 1e6:.0f}M frozen non-embedding weights), "
          f"{precision}, batch {args.batch} x {args.seq} tokens ({args.answer} answer)")
    print(f"  {tps:,.0f} tokens/s over {timed_steps} steps after {args.warmup} warm-up")
    print(f"  model FLOPs per token = 4·N + 6·L·d·S/2 + 4·d·V·a = 4·{frozen:,} + 6·{layers}·{d}·{args.seq}/2 + "
          f"4·{d}·{vocab}·{args.answer}/{args.seq} = {per_token / 1e9:.2f} GFLOP")
    print(f"  achieved {achieved / 1e12:.2f} TFLOP/s; {precision} matmul peak measured {peak / 1e12:.2f} TFLOP/s; "
          f"MFU {100 * out['mfu']:.1f}%")
    if out["peak_allocated_bytes"]:
        print(f"  memory: `tuneline doctor` estimates {guess / 2**30:.1f} GiB for one step; "
              f"peak allocated {out['peak_allocated_bytes'] / 2**30:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
