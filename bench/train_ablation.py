"""What each training speed-up is worth: one forward+backward per variant on the same batches.

Loads the built-in model once (bf16 base, fp32 LoRA r=16 on all linear layers) and times
forward+backward of the answer-only loss on the same BANKING77 micro-batches for each variant,
interleaved over several rounds so that the machine's noise hits all of them alike:

  peft            peft's own LoRA forward, padded length-grouped batches
  fused           tuneline's fused LoRA linear, one linear at a time
  fused+prefix    ... plus the shared prompt prefix computed once per batch
  grouped+prefix  ... with linears that read the same input (q/k/v, gate/up) computed together
                  (tuneline's default)
  packed          fused, grouped LoRA, examples packed into rows of --capacity tokens (no prefix)

Prints real tokens/s per variant (best round and all rounds, wall clock and CPU time), and last
the ratio of tuneline's default to peft's forward.

    python bench/train_ablation.py [--batch 16] [--batches 4] [--rounds 3] [--random]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from train_throughput import REPO, SPEC  # the demo's spec, one definition for the benches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="examples per micro-batch")
    ap.add_argument("--batches", type=int, default=4, help="micro-batches timed per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--capacity", type=int, default=160, help="row length for the packed variant")
    ap.add_argument("--random", action="store_true", help="random batches instead of length-grouped ones")
    ap.add_argument("--cache", type=Path, default=REPO / ".tuneline" / "models")
    args = ap.parse_args()

    from tuneline.curation import prepare
    from tuneline.models import load_model, load_tokenizer, resolve_model_source
    from tuneline.runtime import autocast_for
    from tuneline.spec import load_spec
    from tuneline.spec.models import TrainSpec
    from tuneline.train import fast_lora
    from tuneline.train.loop import encode_all, make_batch
    from tuneline.train.loss import answer_loss_sum
    from tuneline.train.peft_builders import wrap_for_training

    source = resolve_model_source("smollm2-135m")
    tok = load_tokenizer(source, args.cache)
    n = args.batch * args.batches
    encoded, _ = encode_all(tok, prepare(load_spec(SPEC)).train[: 4 * n], 256)
    random.Random(0).shuffle(encoded)
    encoded = encoded[:n]
    if not args.random:  # what tuneline's length-grouped batches look like
        encoded.sort(key=lambda e: len(e.input_ids))
    batches = [encoded[i : i + args.batch] for i in range(0, n, args.batch)]
    model = wrap_for_training(load_model(source, args.cache, dtype="bf16"), TrainSpec())
    model.train()

    variants = {  # name: (fused LoRA, grouped, share prefix, pack capacity)
        "peft": (False, False, False, None),
        "fused": (True, False, False, None),
        "fused+prefix": (True, False, True, None),
        "grouped+prefix": (True, True, True, None),
        "packed": (True, True, False, args.capacity),
    }

    def step(b, share, capacity) -> int:
        batch = make_batch(b, tok.pad_token_id, "cpu", capacity, share)
        with autocast_for("bf16", "cpu"):
            loss, count = answer_loss_sum(model, batch)
        (loss / count).backward()
        model.zero_grad(set_to_none=True)
        return sum(len(e.input_ids) for e in b)

    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (fused, grouped, share, capacity) in variants.items():
            fast_lora.uninstall(model)
            if fused:
                fast_lora.install(model, group=grouped)
            step(batches[0], share, capacity)  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = sum(step(b, share, capacity) for b in batches)
            wall[name].append(tokens / (time.perf_counter() - t0))
            cpu[name].append(tokens / (time.process_time() - c0))
    kind = "random" if args.random else "length-grouped"
    print(f"{args.batches} {kind} micro-batches of {args.batch} BANKING77 examples, {args.rounds} rounds")
    for name in variants:
        print(f"{name:15s} best {max(wall[name]):6.0f} tok/s  rounds {[round(x) for x in wall[name]]}  "
              f"per CPU-second {max(cpu[name]):5.0f}")
    print(f"speed-up (grouped+prefix / peft, best round): {max(wall['grouped+prefix']) / max(wall['peft']):.2f}x")


if __name__ == "__main__":
    main()
