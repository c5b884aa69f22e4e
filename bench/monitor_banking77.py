"""Monitoring on the built-in model with BANKING77 (issue 19's acceptance): held-out BANKING77 test
queries served by the tuned model raise no input-drift alert; queries from an unrelated domain
(ViGGO's video-game sentences, shipped in examples/viggo) do. Prints every detector's statistic
on both windows and the detection delay: the fewest requests of the unrelated traffic after
which each detector fires (with the spec's default monitor settings; a window needs
``window.min_requests`` requests before any verdict).

Needs the demo's workspace with BANKING77 promoted:

    make demo && .venv/bin/tuneline promote banking77-intents 1
    .venv/bin/python bench/monitor_banking77.py [--workspace .tuneline] [--requests 500]

Serves on 127.0.0.1 only and stops by itself; the request log goes to a temporary SQLite file.
"""

from __future__ import annotations

import argparse
import csv
import random
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

MODEL = "banking77-intents"
GRID = (10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500)


def _texts(path: Path, column: str, n: int, seed: int) -> list[str]:
    with path.open() as f:
        rows = [r[column] for r in csv.DictReader(f)]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _serve(app: object) -> tuple[str, object, threading.Thread]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}", server, thread


def _replay(url: str, instruction: str, texts: list[str], workers: int = 8) -> list[float]:
    """Send each text as a chat request; returns the arrival times (one per request, in order)."""
    import httpx

    times: list[float] = [0.0] * len(texts)

    def one(i: int) -> None:
        times[i] = time.time()
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL, "max_tokens": 16,
            "messages": [{"role": "system", "content": instruction}, {"role": "user", "content": texts[i]}]})
        r.raise_for_status()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(texts))))
    return times


def _serve_both(ws, log_url: str, instruction: str, in_domain: list[str], other: list[str]):  # noqa: ANN001, ANN202
    """Serve both traffics one after the other; their arrival times."""
    from tuneline.serve import build_app

    app = build_app(ws, keys=None, log_url=log_url, max_batch=16)
    url, server, thread = _serve(app)
    t0 = time.time()
    try:
        times_in = _replay(url, instruction, in_domain)
        times_other = _replay(url, instruction, other)
    finally:
        server.should_exit = True
        thread.join(60)
        app.state.request_log.close()
        app.state.engine.close()
    print(f"served {len(in_domain) + len(other)} requests in {time.time() - t0:.0f} s", flush=True)
    return times_in, times_other


def _window_check(target, ws, store, encoder, n: int, until: float):  # noqa: ANN001, ANN202
    from tuneline.monitor.check import run_check

    spec = target.spec.model_copy(deep=True)
    spec.monitor.window.requests = n
    spec.monitor.window.min_requests = min(spec.monitor.window.min_requests, n)
    return run_check(replace(target, spec=spec), ws, store, now=until, encoder=encoder, send=False).check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=str(REPO / ".tuneline"))
    ap.add_argument("--requests", type=int, default=500, help="Requests of each traffic (default 500).")
    ap.add_argument("--log", type=Path, default=None,
                    help="SQLite request log of an earlier run of this benchmark: check it again without serving.")
    args = ap.parse_args()

    from tuneline.monitor.check import open_encoder, target_of
    from tuneline.monitor.store import RequestLog
    from tuneline.workspace import Workspace

    ws = Workspace.at(args.workspace)
    target = target_of(MODEL, ws)
    instruction = target.spec.task.instruction or ""
    in_domain = _texts(REPO / "examples/banking77/data/test.csv", "text", args.requests, seed=1)
    other = _texts(REPO / "examples/viggo/data/test.csv", "ref", args.requests, seed=1)
    if args.log is not None:
        log_url = f"sqlite:///{args.log}"
        rows = RequestLog(log_url).requests(MODEL)
        times_in = [float(r["created"]) for r in rows[: args.requests]]
        times_other = [float(r["created"]) for r in rows[args.requests: 2 * args.requests]]
        print(f"checking {log_url} again ({len(rows)} requests)", flush=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="monitor-bench-"))
        log_url = f"sqlite:///{tmp / 'requests.db'}"
        times_in, times_other = _serve_both(ws, log_url, instruction, in_domain, other)
        print(f"request log: {tmp / 'requests.db'} (check it again with --log)", flush=True)

    store = RequestLog(log_url)
    encoder = open_encoder(target, ws)
    end_in = max(times_in) + 1e-3
    held_out = _window_check(target, ws, store, encoder, args.requests, end_in)
    drifted = _window_check(target, ws, store, encoder, args.requests, max(times_other) + 1e-3)
    print(f"\n{'detector':34} {'BANKING77 test':>22} {'ViGGO (other domain)':>24}")
    by_name = {r.name: r for r in drifted.results}
    for r in held_out.results:
        d = by_name.get(r.name)
        def cell(x):  # noqa: ANN001, ANN202, E306
            if x is None:
                return "-"
            v = "-" if x.value is None else f"{x.value:.3f}"
            p = "" if x.p_value is None else f" p={x.p_value:.3g}"
            return f"{v}{p} {'ALERT' if x.fired else x.status}"
        print(f"{r.name:34} {cell(r):>22} {cell(d):>24}")

    print("\ndetection delay (requests of ViGGO traffic before each detector fires; held-out BANKING77 "
          "windows of the same size in brackets: fired or not)")
    ordered = sorted(times_other)
    first_fire: dict[str, int] = {}
    false_alarms: dict[int, list[str]] = {}
    for n in [g for g in GRID if g <= args.requests]:
        check = _window_check(target, ws, store, encoder, n, ordered[n - 1] + 1e-3)
        for r in check.fired:
            first_fire.setdefault(r.name, n)
        control = _window_check(target, ws, store, encoder, n, end_in)
        false_alarms[n] = [r.name for r in control.fired]
    for name in by_name:
        print(f"  {name:34} {first_fire.get(name, 'never (within ' + str(args.requests) + ')')}")
    print("  held-out BANKING77 windows that fired: "
          + ", ".join(f"n={n}: {', '.join(v) or 'none'}" for n, v in false_alarms.items()))
    store.close()


if __name__ == "__main__":
    main()
