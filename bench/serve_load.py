"""The server under load (issue 16's acceptance): many concurrent clients on loopback for a fixed time.

Starts tuneline's server on 127.0.0.1 (a tiny random Llama on the built-in model's tokenizer, or
with --builtin the built-in model itself) with 3 LoRA adapters behind an API key, then runs
--clients concurrent clients for --duration seconds (and at most --max-requests requests): chat and
completions, streaming and not, over the 3 adapters; some clients hang up mid-stream, some send
bodies over the size limit, some prompts carry planted PII (card numbers after a newline, emails,
phone numbers). It prints requests answered, shed (429), 413, other 4xx, 5xx (must be 0),
disconnected, p50/p95/p99 latency and time to first token; then reads the request log and checks
that every answered request was logged exactly once (status 200) and that no planted PII is
stored in clear. Exit status 1 when a check fails.

    .venv/bin/python bench/serve_load.py [--clients 200] [--duration 60] [--builtin]

Loopback only; stops by itself (the clients stop at --duration, everything at --duration + 180 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

KEY = "sk-bench"
TEXTS = ["my card has not arrived yet", "what is the exchange rate for euros?", "I lost my card yesterday",
         "how do I top up my account", "why was I charged a fee", "can I change my PIN"]
# planted PII: (text put in the prompt, what must not be stored)
PII = [("my card:\n4111 1111 1111 1111", ["4111 1111 1111 1111", "4111111111111111"]),
       ("card number\t5500 0000 0000 0004 please", ["5500 0000 0000 0004", "5500000000000004"]),
       ("write to\njane.doe@example.com", ["jane.doe@example.com"]),
       ("call me on\n+1 415 555 0134", ["415 555 0134", "4155550134"])]


def make_model(out: Path, builtin: bool) -> tuple[Any, Path]:
    """(model source for load_model, a local model folder for adapters)."""
    from tuneline.models import ensure_converted, resolve_model_source
    from tuneline.workspace import Workspace

    ws = Workspace.at(REPO / ".tuneline")
    source = resolve_model_source("smollm2-135m")
    builtin_dir = ensure_converted(source, ws.models_dir)
    if builtin:
        return source, builtin_dir
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(builtin_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out / "tiny")
    tok.save_pretrained(out / "tiny")
    return resolve_model_source(str(out / "tiny")), out / "tiny"


class Stats:
    def __init__(self) -> None:
        self.status: Counter[str] = Counter()
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.answered: list[str] = []  # response ids of 200s
        self.planted = 0
        self.sent = 0


async def client(cid: int, url: str, models: list[str], stats: Stats, stop_at: float, budget: list[int],
                 seed: int, max_tokens: int) -> None:
    import httpx

    rng = random.Random(seed * 1_000_003 + cid)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as http:
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            stats.sent += 1
            kind = rng.choices(["chat", "chat-stream", "completion", "completion-stream", "hangup", "too-large"],
                               [35, 25, 15, 12, 8, 5])[0]
            text = rng.choice(TEXTS)
            if rng.random() < 0.3:
                text = f"{text} {rng.choice(PII)[0]}"
                stats.planted += 1
            model = rng.choice(models)
            chat = kind.startswith("chat") or kind == "hangup" and rng.random() < 0.5
            stream = kind.endswith("stream") or kind == "hangup"
            body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(max_tokens // 2, max_tokens),
                                    "stream": stream}
            if chat:
                body["messages"] = [{"role": "user", "content": text}]
            else:
                body["prompt"] = text
            path = "/v1/chat/completions" if chat else "/v1/completions"
            t0 = time.perf_counter()
            try:
                if kind == "too-large":
                    body["prompt"] = "x" * (2 << 20)
                    r = await http.post(path, json=body)
                    stats.status[str(r.status_code)] += 1
                    continue
                if not stream:
                    r = await http.post(path, json=body)
                    stats.status[str(r.status_code)] += 1
                    if r.status_code == 200:
                        stats.latency.append(time.perf_counter() - t0)
                        stats.answered.append(r.json()["id"])
                    elif r.status_code == 429:
                        await asyncio.sleep(float(r.headers.get("retry-after", "1")) * rng.random())
                    continue
                async with http.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        stats.status[str(r.status_code)] += 1
                        if r.status_code == 429:
                            await asyncio.sleep(float(r.headers.get("retry-after", "1")) * rng.random())
                        continue
                    rid, first, done, error = None, None, False, None
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"]
                            break
                        rid = event["id"]
                        choice = (event.get("choices") or [{}])[0]
                        piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                        if piece and first is None:
                            first = time.perf_counter() - t0
                            if kind == "hangup":
                                break  # hang up mid-stream
                    if kind == "hangup" and not done:
                        stats.status["disconnected"] += 1
                    elif error is not None:
                        stats.status["5xx-in-stream" if error.get("type") == "server_error" else
                                     f"stream-{error.get('code')}"] += 1
                    elif done and rid is not None:
                        stats.status["200"] += 1
                        stats.latency.append(time.perf_counter() - t0)
                        stats.answered.append(rid)
                        if first is not None:
                            stats.ttft.append(first)
                    else:
                        stats.status["stream-cut"] += 1
            except httpx.HTTPError as exc:
                stats.status[f"transport:{type(exc).__name__}"] += 1


def run_clients(url: str, models: list[str], clients: int, duration: float, max_requests: int, seed: int,
                max_tokens: int) -> Stats:
    async def go() -> Stats:
        stats = Stats()
        stop_at = time.monotonic() + duration
        budget = [max_requests]
        tasks = [client(c, url, models, stats, stop_at, budget, seed, max_tokens) for c in range(clients)]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + 180)
        return stats

    return asyncio.run(go())


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{1000 * v[min(len(v) - 1, int(q * len(v)))]:.0f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--builtin", action="store_true", help="serve the built-in model (default: a tiny random one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="server's model threads (default: cores - 1)")
    args = ap.parse_args()

    import uvicorn

    from tuneline.models import load_model, load_tokenizer
    from tuneline.registry import VersionInfo
    from tuneline.runtime import autocast_for
    from tuneline.serve import Engine, Key, RequestLog, ServerConfig
    from tuneline.serve.app import create_app

    tmp = Path(tempfile.mkdtemp(prefix="tuneline-serve-load-"))
    print(f"preparing in {tmp} ...", flush=True)
    source, model_dir = make_model(tmp, args.builtin)
    from serve_throughput import make_adapters  # bench/ is on the path when run as a script

    paths = make_adapters(model_dir, tmp, 3, r=8)
    versions = {f"load{k}": VersionInfo(f"load{k}", 1, None, str(p), "") for k, p in enumerate(paths)}
    import torch

    from tuneline.serve import compute_threads

    torch_threads = compute_threads(args.threads)
    torch.set_num_threads(torch_threads)
    dtype = "bf16" if args.builtin else "fp32"
    engine = Engine(load_model(source, tmp / "models", dtype=dtype), load_tokenizer(source, tmp / "models"),
                    max_batch=args.max_batch, autocast=autocast_for("bf16", "cpu") if args.builtin else None)
    log = RequestLog(f"sqlite:///{tmp / 'requests.db'}")
    config = ServerConfig(registry_uri="unused", keys={KEY: Key("bench", {"*"})}, max_queue=args.max_queue,
                          resolve=lambda ref: versions[ref.partition("@")[0]],
                          adapters_path=lambda info: info.source)
    app = create_app(engine, log, config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                          timeout_graceful_shutdown=30))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    models = list(versions)

    warm_ids: list[str] = []
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as h:
        for m in models:  # load each adapter once before the clock starts
            r = h.post("/v1/completions", json={"model": m, "prompt": "warm up", "max_tokens": 2})
            r.raise_for_status()
            warm_ids.append(r.json()["id"])

    # the clients run in a process of their own: in the server's process they would hold its
    # interpreter lock while the server streams and batches
    print(f"{args.clients} clients for {args.duration:g} s on {url} (server: {torch_threads} model threads) ...",
          flush=True)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with ctx.Pool(1) as pool:
        stats = pool.apply(run_clients, (url, models, args.clients, args.duration, args.max_requests, args.seed,
                                         args.max_tokens))
    wall = time.perf_counter() - t0
    server.should_exit = True
    time.sleep(1.0)
    engine.close()
    for name in ("flush", "close"):  # the request log writes what it still holds
        fn = getattr(log, name, None)
        if fn is not None:
            fn(30) if name == "flush" else fn()

    st = stats.status
    fivexx = sum(n for k, n in st.items() if k.startswith("5") or k.startswith("transport"))
    other_4xx = sum(n for k, n in st.items() if k.startswith("4") and k not in ("429", "413"))
    batches = list(engine.batch_sizes)
    print(f"model: {'built-in SmolLM2-135M bf16' if args.builtin else 'tiny random Llama (2 layers, hidden 64)'}, "
          f"3 adapters, max_batch {args.max_batch}, max_queue {args.max_queue}, {torch_threads} model threads, "
          f"{wall:.1f} s")
    print(f"requests sent {stats.sent}: answered {st['200']}, shed (429) {st['429']}, too large (413) {st['413']}, "
          f"other 4xx {other_4xx}, 5xx {fivexx}, disconnected mid-stream {st['disconnected']}")
    print(f"all outcomes: {dict(sorted(st.items()))}")
    print(f"latency (answered): p50 {pct(stats.latency, 0.5)}, p95 {pct(stats.latency, 0.95)}, "
          f"p99 {pct(stats.latency, 0.99)}; {st['200'] / wall:.1f} answers/s")
    print(f"time to first token (streams): p50 {pct(stats.ttft, 0.5)}, p95 {pct(stats.ttft, 0.95)}, "
          f"p99 {pct(stats.ttft, 0.99)}; mean batch {statistics.mean(batches) if batches else 0:.1f} rows")

    from sqlalchemy import create_engine, text

    with create_engine(f"sqlite:///{tmp / 'requests.db'}").connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text("SELECT id, status, prompt, response FROM requests"))]
    logged = Counter(r["id"] for r in rows if r["status"] == 200)
    answered = Counter(stats.answered)
    missing = [i for i in answered if logged[i] == 0]
    twice = [i for i, n in logged.items() if n > 1] + [i for i, n in answered.items() if n > 1]
    extra = [i for i in logged if i not in answered and i not in warm_ids]
    leaked = [(r["id"], s) for r in rows for _, secrets in PII for s in secrets
              if s in (r["prompt"] or "") or s in (r["response"] or "")]
    print(f"request log: {len(rows)} rows, {sum(logged.values())} with status 200; answered and not logged "
          f"{len(missing)}, logged twice {len(twice)}, logged 200 but not answered {len(extra)}; "
          f"{stats.planted} prompts with planted PII, rows with PII in clear {len({i for i, _ in leaked})}")
    ok = fivexx == 0 and not missing and not twice and not leaked and st["200"] > 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
