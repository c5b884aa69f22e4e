"""The classifier head (``task.head: classifier``) on BANKING77 and the built-in model: accuracy with its
95% interval on the demo's test rows, training time, and batch-1 latency beside the generative LoRA's.

    PYTHONPATH=src python bench/classifier_head.py examples/banking77/tuneline.yaml \
        --workspace /work/main/.tuneline --generative /work/main/.tuneline/runs/banking77-intents/adapter \
        --out /tmp/head-bench

Trains on the rows `tuneline run` trains the demo on (the spec's curation, no workspace writes), with the
spec's train section (``--epochs`` overrides), evaluates on its test items, then times single requests
(the same rows, the same code path as `tuneline eval`'s latency) for the classifier and, given
``--generative``, for that generative adapter (merged as served, label-constrained decoding).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np

from tuneline.curation import prepare
from tuneline.eval import EvalSet, Evaluation, stats
from tuneline.eval.classify import classify_detailed
from tuneline.eval.generate import GenerateOptions
from tuneline.models import load_model, load_tokenizer, resolve_model_source
from tuneline.pipeline.evaluation import evaluation_items, load_adapter_model
from tuneline.runtime import Compute
from tuneline.spec import load_spec
from tuneline.train import TrainOptions
from tuneline.train.classifier import train_classifier
from tuneline.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--workspace", default=".tuneline")
    ap.add_argument("--generative", default=None, help="a generative adapter folder to time beside the classifier")
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--out", default="/tmp/head-bench")
    ap.add_argument("--requests", type=int, default=32, help="single requests timed per system, interleaved")
    ap.add_argument("--resume", action="store_true", help="continue the training in --out from its last checkpoint")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    loaded = load_spec(args.spec)
    spec = loaded.spec
    cfg = spec.train if args.epochs is None else spec.train.model_copy(update={"epochs": args.epochs})
    ws = Workspace(Path(args.workspace).resolve())
    source = resolve_model_source(spec.model, loaded.base_dir)
    tok = load_tokenizer(source, ws.models_dir)
    data = prepare(loaded, tok)
    test = evaluation_items(spec, data)
    labels = data.labels or []
    compute = Compute.resolve(cfg.precision, cfg.method)
    out = Path(args.out)
    print(f"train {len(data.train)} rows, test {len(test)} items, {len(labels)} labels, {compute}", flush=True)

    model = load_model(source, ws.models_dir, dtype=compute.base_dtype)
    t0 = time.perf_counter()
    classifier, result = train_classifier(cfg, model, tok, data.train, out, TrainOptions(show_progress=False, resume=args.resume),
                                          labels=labels)
    wall = time.perf_counter() - t0
    print(f"trained {result.steps} steps in {result.seconds:.0f}s (wall {wall:.0f}s), loss {result.final_loss:.4f}",
          flush=True)
    classifier.merge_adapter()
    gen = classify_detailed(classifier, tok, test, GenerateOptions(
        batch_size=spec.eval.batch_size, autocast=compute.autocast(), show_progress=False))
    correct = np.array([a == ex.reference for a, ex in zip(gen.texts, test, strict=True)], dtype=float)
    acc = stats.bootstrap(stats.mean_metric(correct), len(test), resamples=spec.eval.bootstrap)
    print(f"accuracy {acc.value:.3f} [{acc.low:.3f}, {acc.high:.3f}] on {len(test)} rows "
          f"({gen.seconds_per_example * 1000:.1f} ms/row at batch {spec.eval.batch_size})", flush=True)

    report: dict[str, object] = {
        "train_rows": len(data.train), "test_rows": len(test), "steps": result.steps,
        "train_seconds": result.seconds, "final_loss": result.final_loss, "accuracy": [acc.value, acc.low, acc.high]}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    # single requests through the code path of `tuneline eval`'s latency (Evaluation._generate at batch 1),
    # the two systems alternating on the same rows so that both see the same load on this shared CPU
    evaluation = Evaluation(spec, tok, [EvalSet("test", "test", test)], labels, autocast=compute.autocast(),
                            show_progress=False)
    systems = {"classifier": classifier}
    if args.generative:
        systems["generative"] = load_adapter_model(source, ws, args.generative, "cpu", compute.base_dtype)
    picks = random.Random(1).sample(range(len(test)), min(args.requests, len(test)))
    times: dict[str, list[float]] = {k: [] for k in systems}
    for m in systems.values():  # warm-up
        evaluation._generate(m, [test[picks[0]]], "warm-up", batch_size=1, progress=False)
    for i in picks:
        for name, m in systems.items():
            t = time.perf_counter()
            evaluation._generate(m, [test[i]], "latency", batch_size=1, progress=False)
            times[name].append((time.perf_counter() - t) * 1000)
    for name, ms in times.items():
        arr = np.array(ms)
        report[f"{name}_latency_ms"] = {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                                        "mean": float(arr.mean()), "n": len(ms)}
    if "generative" in times:
        ratio = np.array(times["generative"]) / np.array(times["classifier"])
        report["generative_over_classifier_median"] = float(np.median(ratio))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
