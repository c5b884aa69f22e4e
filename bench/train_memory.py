"""Peak memory and speed of training by row length, with the eager attention and with SDPA.

Trains the built-in SmolLM2-135M-Instruct (LoRA r=16 on every linear, the precision `auto` picks,
batches of 16 rows) with tuneline's own `train()` on random token rows of 50, 170 and 350 tokens,
the last 16 of each the answer, once with the eager attention the CPU trains with and once with
PyTorch's SDPA. Each configuration runs in a process of its own, so the peak resident memory it
prints (Linux's high-water mark, ``ru_maxrss``) is that training's alone; the model's own share is
printed beside it (the resident memory after loading, before training).

    .venv/bin/python bench/train_memory.py [--steps 4] [--lengths 50 170 350]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(length: int, attention: str, steps: int) -> dict[str, float]:
    """Train ``steps`` steps on rows of ``length`` tokens with ``attention``; the numbers as a dict."""
    from tuneline.data.tokenize import IGNORE_INDEX, Encoded
    from tuneline.models import load_model, resolve_model_source
    from tuneline.models.loading import load_tokenizer
    from tuneline.runtime import resolve_precision
    from tuneline.spec.models import TrainSpec
    from tuneline.train import TrainOptions, train
    from tuneline.workspace import Workspace

    models = Workspace.at(ROOT / ".tuneline").models_dir
    source = resolve_model_source("smollm2-135m")
    precision = resolve_precision("auto", "cpu")
    model = load_model(source, models, dtype=precision)
    if attention != "eager":
        model.set_attn_implementation(attention)
    loaded = _rss_mb()
    rng, answer, batch = random.Random(0), 16, 16
    rows = [Encoded([rng.randrange(10, 49000) for _ in range(length)],
                    [IGNORE_INDEX] * (length - answer) + [rng.randrange(10, 49000) for _ in range(answer)], f"row{i}")
            for i in range(steps * batch)]
    cfg = TrainSpec(max_steps=steps, batch_size=batch, seq_len=length, precision=precision, share_prefix=False,
                    checkpoint_every=10**6)
    t0 = time.perf_counter()
    _, result = train(cfg, model, load_tokenizer(source, models), [], Path(tempfile.mkdtemp()),
                      TrainOptions(show_progress=False, encoded_train=(rows, [])))
    return {"length": length, "attention": attention, "precision": precision, "seconds": time.perf_counter() - t0,
            "tokens_per_second": result.tokens_per_second, "loaded_mb": loaded, "peak_mb": _rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 170, 350])
    parser.add_argument("--child", nargs=2, metavar=("LENGTH", "ATTENTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.steps)))
        return
    print(f"{'tokens a row':>12} {'attention':>9} {'tokens/s':>9} {'peak RSS MB':>12} {'model loaded MB':>16}")
    for length in args.lengths:
        for attention in ("eager", "sdpa"):
            out = subprocess.run([sys.executable, __file__, "--child", str(length), attention, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{length:>12} {attention:>9} {r['tokens_per_second']:>9.0f} {r['peak_mb']:>12,.0f} "
                  f"{r['loaded_mb']:>16,.0f}", flush=True)


if __name__ == "__main__":
    main()
