"""Embedding-drift tests compared: tuneline's (MMD with a permutation p-value, domain classifier
with a Mann-Whitney p-value; both also need an effect size) against Evidently 0.7's embedding
drift methods (model, mmd, ratio, distance, at their defaults), on the same checks:

- false alarms: two disjoint random halves of BANKING77 train (reference: 2000 rows of one half,
  current: a window of the other), --seeds seeds;
- false alarms, held-out test queries: reference = 2000 train rows, current = a window of
  BANKING77 test.csv (the queries a served model would see), --seeds seeds;
- detection, other intents: reference = rows of a random half of the 77 intents, current =
  rows of the other intents (the same domain, new topics), --detect-seeds seeds;
- detection, unrelated domain: current = ViGGO video-game sentences (valid.csv refs).

Every check at window sizes --windows; the table gives how often each method fired in each
check (halves and test queries: false alarms; other intents and viggo: detections) and the
mean seconds per check. Embeddings: the shipped all-MiniLM-L6-v2, cached in the
workspace (the first run embeds ~10,700 texts, a few minutes on 2 cores).

    .venv/bin/python bench/monitor_drift.py [--seeds 20] [--detect-seeds 5] [--windows 50,100,200,500]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tuneline.monitor import stats  # noqa: E402
from tuneline.monitor.detectors import effective_permutations  # noqa: E402
from tuneline.spec.monitor import InputDriftSpec  # noqa: E402

REFERENCE_ROWS = 2000
Check = Callable[[np.ndarray, np.ndarray, int], tuple[bool, float]]  # (fired, seconds)
_MEMO: dict[tuple[str, int, int, int], tuple[stats.TestResult, float]] = {}  # one test, two thresholds


def load(workspace: str | None) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """(BANKING77 train embeddings, their intents, BANKING77 test embeddings, ViGGO valid refs' embeddings)."""
    from tuneline.retrieval.encoder import load_encoder
    from tuneline.workspace import Workspace

    data = REPO / "examples"
    with (data / "banking77" / "data" / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    with (data / "banking77" / "data" / "test.csv").open() as f:
        test = [r["text"] for r in csv.DictReader(f)]
    with (data / "viggo" / "data" / "valid.csv").open() as f:
        viggo = [r["ref"] for r in csv.DictReader(f)]
    enc = load_encoder("all-minilm-l6-v2", cache_root=Workspace.at(workspace).embeddings_dir)
    return enc.embed([r["text"] for r in rows]), [r["category"] for r in rows], enc.embed(test), enc.embed(viggo)


def ours(method: str, min_effect: float) -> Check:
    cfg = InputDriftSpec()
    perms = effective_permutations(cfg.permutations, cfg.p_value)

    def check(ref: np.ndarray, cur: np.ndarray, seed: int) -> tuple[bool, float]:
        key = (method, id(ref), id(cur), seed)
        if key not in _MEMO:
            t0 = time.perf_counter()
            if method == "mmd":
                res = stats.mmd_test(ref, cur, permutations=perms, seed=seed)
            else:
                res = stats.classifier_test(ref, cur, seed=seed)
            _MEMO[key] = (res, time.perf_counter() - t0)
        res, seconds = _MEMO[key]
        return res.p_value <= cfg.p_value and res.effect >= min_effect, seconds

    return check


def evidently(name: str) -> Check | None:
    try:
        import pandas as pd
        from evidently.legacy.metrics.data_drift import embedding_drift_methods as edm
    except Exception as e:  # noqa: BLE001 - report exactly why Evidently is left out
        print(f"Evidently left out: {type(e).__name__}: {e}")
        return None
    method = getattr(edm, name)()

    def check(ref: np.ndarray, cur: np.ndarray, seed: int) -> tuple[bool, float]:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, drifted, _ = method(pd.DataFrame(cur), pd.DataFrame(ref))
        return bool(drifted), time.perf_counter() - t0

    return check


def scenarios(emb: np.ndarray, labels: list[str], test: np.ndarray, viggo: np.ndarray, window: int,
              seeds: int, detect_seeds: int) -> dict[str, list[tuple[np.ndarray, np.ndarray, int]]]:
    """(reference, current, seed) triples of each check."""
    n = len(emb)
    out: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = defaultdict(list)
    for seed in range(seeds):
        perm = np.random.default_rng(seed).permutation(n)
        out["false alarms"].append((emb[perm[:REFERENCE_ROWS]], emb[perm[n // 2:n // 2 + window]], 10_000 + seed))
        test_rows = np.random.default_rng(500 + seed).permutation(len(test))[:window]
        out["test queries"].append((emb[perm[:REFERENCE_ROWS]], test[test_rows], 10_000 + seed))
    intents = sorted(set(labels))
    for seed in range(detect_seeds):
        rng = np.random.default_rng(1000 + seed)
        half = set(rng.choice(intents, len(intents) // 2, replace=False).tolist())
        ia = rng.permutation([i for i in range(n) if labels[i] in half])
        ib = rng.permutation([i for i in range(n) if labels[i] not in half])
        out["other intents"].append((emb[ia[:REFERENCE_ROWS]], emb[ib[:window]], 10_000 + seed))
        ref = emb[rng.permutation(n)[:REFERENCE_ROWS]]
        out["viggo"].append((ref, viggo[rng.permutation(len(viggo))[:window]], 10_000 + seed))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--detect-seeds", type=int, default=5)
    ap.add_argument("--windows", default="50,100,200,500")
    ap.add_argument("--workspace", default=None, help="tuneline workspace (embedding cache); default ./.tuneline")
    args = ap.parse_args()

    emb, labels, test, viggo = load(args.workspace)
    methods: dict[str, Check | None] = {
        "tuneline mmd (min MMD^2 0.05)": ours("mmd", 0.05),
        "tuneline mmd (min MMD^2 0.01)": ours("mmd", 0.01),
        "tuneline classifier (min AUC-0.5 0.05)": ours("classifier", 0.05),
        "evidently model (AUC>0.55)": evidently("model"),
        "evidently mmd (MMD^2>0.015)": evidently("mmd"),
        "evidently ratio (>20% dims)": evidently("ratio"),
        "evidently distance (eucl>0.2)": evidently("distance"),
    }
    print(f"{'method':40s} {'window':>6s} {'halves':>7s} {'test queries':>13s} {'other intents':>14s} "
          f"{'viggo':>6s} {'s/check':>8s}")
    for window in [int(w) for w in args.windows.split(",")]:
        checks = scenarios(emb, labels, test, viggo, window, args.seeds, args.detect_seeds)
        _MEMO.clear()
        for name, check in methods.items():
            if check is None:
                continue
            rates, seconds, count = {}, 0.0, 0
            for scenario, cases in checks.items():
                fired = 0
                for ref, cur, seed in cases:
                    hit, took = check(ref, cur, seed)
                    fired += hit
                    seconds += took
                    count += 1
                rates[scenario] = f"{fired}/{len(cases)}"
            print(f"{name:40s} {window:6d} {rates['false alarms']:>7s} {rates['test queries']:>13s} "
                  f"{rates['other intents']:>14s} {rates['viggo']:>6s} {seconds / count:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
