"""What caching the frozen layers is worth: LoRA on the last layers, the layers below computed once.

Trains the built-in SmolLM2-135M with LoRA (r=16, all linear layers) on the same BANKING77 rows
for the same epochs, each variant in its own process, with tuneline's defaults otherwise:

  every layer     LoRA on all 30 decoder layers (the default placement)
  last N          ``lora.layers: N``, ``cache_frozen_layers: false``: the frozen layers below
                  computed in every step (no backward pass through them)
  last N, cached  ``lora.layers: N`` with the default ``cache_frozen_layers: true``: their states
                  computed once per example before the first step

Tokens/s is real (non-padding) tokens trained over the wall time of the whole ``train`` call, the
one pass that computes the cached states included. Each variant also reports its loss on 200
held-out rows (the cache must not change it beyond rounding) and its peak RSS. The variants run in
rounds, in a rotating order, so the machine's noise hits all of them alike; printed last, the
ratios from the best round of each.

    python bench/frozen_stem.py [--rows 320] [--epochs 2] [--layers 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from train_throughput import _held_out_loss, _in_child, _peak_rss_gb

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "examples" / "banking77" / "tuneline.yaml"

VARIANTS = {"every layer": (None, True), "last N": ("N", False), "last N, cached": ("N", True)}


def run(rows: int, epochs: float, layers: int | None, cached: bool, cache: Path, out: dict) -> None:
    from tuneline.curation import prepare
    from tuneline.models import load_model, load_tokenizer, resolve_model_source
    from tuneline.runtime import resolve_precision
    from tuneline.spec import load_spec
    from tuneline.spec.models import TrainSpec
    from tuneline.train import TrainOptions, train

    source = resolve_model_source("smollm2-135m")
    precision = resolve_precision("auto", "cpu")
    tok = load_tokenizer(source, cache)
    model = load_model(source, cache, dtype=precision)
    cfg = TrainSpec(epochs=epochs, batch_size=16, lr=1.5e-3, seq_len=160, seed=0,
                    lora={"r": 16, "alpha": 32, "layers": layers}, cache_frozen_layers=cached)
    examples = prepare(load_spec(SPEC)).train[:rows]
    t0 = time.perf_counter()
    trained, result = train(cfg, model, tok, examples, Path(tempfile.mkdtemp()), TrainOptions(show_progress=False))
    wall = time.perf_counter() - t0
    out.update(tokens=result.train_tokens, wall=wall, steps=result.steps, final_loss=result.final_loss,
               held_out=_held_out_loss(trained, tok, rows, precision), rss=_peak_rss_gb())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=320, help="training rows (BANKING77, the demo's sample)")
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--layers", type=int, default=10, help="N: LoRA on the last N decoder layers")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=REPO / ".tuneline" / "models")
    args = ap.parse_args()

    names = list(VARIANTS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            layers, cached = VARIANTS[name]
            res = _in_child(run, args.rows, args.epochs, args.layers if layers else None, cached, args.cache)
            res["tps"] = res["tokens"] / res["wall"]
            results[name].append(res)
            print(f"round {r + 1} {name.replace('N', str(args.layers)):22s} {res['tps']:7.1f} tok/s  "
                  f"{res['wall']:6.1f}s for {res['steps']} steps  held-out loss {res['held_out']:.4f}  "
                  f"final loss {res['final_loss']:.4f}  peak RSS {res['rss']:.2f} GB", flush=True)

    best = {name: max(results[name], key=lambda x: x["tps"]) for name in names}
    print(f"\n{args.rows} rows x {args.epochs:g} epochs, LoRA on the last {args.layers} layers; best round of each:")
    for name in names:
        b = best[name]
        print(f"  {name.replace('N', str(args.layers)):22s} {b['tps']:7.1f} tok/s  held-out loss {b['held_out']:.4f}")
    cached, plain, every = (best[n]["tps"] for n in ("last N, cached", "last N", "every layer"))
    print(f"cached vs computed every step: {cached / plain:.2f}x; vs LoRA on every layer: {cached / every:.2f}x")


if __name__ == "__main__":
    main()
