"""Serving throughput: one adapter vs eight adapters mixed in the same batches.

Starts tuneline's server on loopback with the built-in model and 8 LoRA adapters (r=16, all
linear layers, small random weights so every adapter computes something different while answers
keep a similar length), then drives it with concurrent OpenAI-style clients for a fixed number
of chat requests: once with every request for one adapter, once spread round-robin over all 8.
Prints requests/s, completion tokens/s and p50/p95 latency of both; the last line is the ratio
(mixed / single). Goal (issue 6): the mix keeps at least 80% of the single-adapter throughput.

    .venv/bin/python bench/serve_throughput.py [--requests 64] [--clients 8] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import csv
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def make_adapters(model_dir: Path, out: Path, n: int, r: int = 16) -> list[Path]:
    """``n`` LoRA adapters of rank ``r`` with small random B (each answers differently)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for k in range(n):
        torch.manual_seed(k)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        peft_model.save_pretrained(out / f"adapter{k}")
        paths.append(out / f"adapter{k}")
    return paths


def drive(url: str, models: list[str], prompts: list[str], clients: int, max_tokens: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal tokens
        body = {"model": models[i % len(models)], "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600,
                       headers={"Authorization": "Bearer bench"})
        dt = time.perf_counter() - t0
        r.raise_for_status()
        with lock:
            latencies.append(dt)
            tokens += r.json()["usage"]["completion_tokens"]

    n = len(prompts)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"rps": n / wall, "tps": tokens / wall, "p50": 1000 * statistics.median(lat),
            "p95": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], "wall": wall, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    args = ap.parse_args()

    import uvicorn

    from tuneline.models import ensure_converted, load_model, load_tokenizer, resolve_model_source
    from tuneline.registry import VersionInfo
    from tuneline.runtime import autocast_for
    from tuneline.serve import Engine, Key, RequestLog, ServerConfig
    from tuneline.serve.app import create_app
    from tuneline.workspace import Workspace

    ws = Workspace.at(REPO / ".tuneline")
    source = resolve_model_source("smollm2-135m")
    model_dir = ensure_converted(source, ws.models_dir)
    tmp = Path(tempfile.mkdtemp(prefix="tuneline-serve-bench-"))
    print(f"making {args.adapters} adapters in {tmp} ...", flush=True)
    paths = make_adapters(model_dir, tmp, args.adapters)
    versions = {f"bench{k}": VersionInfo(f"bench{k}", 1, None, str(p), "") for k, p in enumerate(paths)}

    model = load_model(source, ws.models_dir, dtype="bf16")
    engine = Engine(model, load_tokenizer(source, ws.models_dir), max_batch=args.clients,
                    autocast=autocast_for("bf16", "cpu"))
    config = ServerConfig(registry_uri="unused", keys={"bench": Key("bench", {"*"})},
                          resolve=lambda ref: versions[ref.partition("@")[0]],
                          adapters_path=lambda info: info.source)
    app = create_app(engine, RequestLog(f"sqlite:///{tmp / 'requests.db'}"), config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"

    with (REPO / "examples/banking77/data/test.csv").open() as f:
        texts = [row["text"] for _, row in zip(range(args.requests), csv.DictReader(f), strict=False)]
    names = list(versions)
    drive(url, names, texts[: 2 * args.clients], args.clients, args.max_tokens)  # loads every adapter; warm-up
    engine.batch_sizes.clear()
    single = drive(url, names[:1], texts, args.clients, args.max_tokens)
    single_batches = list(engine.batch_sizes)
    engine.batch_sizes.clear()
    mixed = drive(url, names, texts, args.clients, args.max_tokens)
    mixed_batches = list(engine.batch_sizes)
    server.should_exit = True
    engine.close()

    print(f"{args.requests} chat requests, {args.clients} concurrent clients, max_tokens {args.max_tokens}, "
          f"built-in model bf16 on CPU, {args.adapters} LoRA adapters (r=16, all linear layers)")
    for label, r, b in (("1 adapter ", single, single_batches), (f"{args.adapters} adapters", mixed, mixed_batches)):
        mean_batch = sum(b) / max(1, len(b))
        print(f"  {label}: {r['rps']:.2f} req/s, {r['tps']:.1f} completion tok/s ({r['tokens']} tokens), "
              f"p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms, mean batch {mean_batch:.1f} rows")
    print(f"mixed / single throughput: {mixed['rps'] / single['rps']:.2f}")


if __name__ == "__main__":
    main()
