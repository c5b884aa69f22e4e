"""``tuneline serve``: the OpenAI-compatible server under uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from tuneline.audit import record, trail_of
from tuneline.cli.console import err_console
from tuneline.cli.options import WorkspaceOpt
from tuneline.errors import Problem, TunelineError
from tuneline.runtime.extras import require_extra
from tuneline.workspace import Workspace


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    keys: Annotated[Path | None, typer.Option(
        help="API keys file (YAML/JSON: keys: [{name, key: SK or sha256: HEX, models: ['*' | NAME | NAME@ALIAS | "
             "NAME@3], metrics: true}]); NAME@production limits a key to that alias (and plain NAME). "
             "Default: $TUNELINE_API_KEYS (key=model1,model2;key2=*).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys (local experiments only: "
                                                            "only Host localhost/127.0.0.1/[::1] is accepted, "
                                                            "see --allowed-host).")] = False,
    log_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL of the request log (default: sqlite in the workspace).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the registered models use).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests generated together in one batch.")] = 8,
    max_queue: Annotated[int, typer.Option(
        min=0, help="Requests admitted beyond one batch; more are refused with 429 and Retry-After.")] = 64,
    request_timeout: Annotated[float, typer.Option(
        min=0, help="Seconds a request may take from arrival to its last token; past it, generation stops and the "
                    "client gets 504 (0: no deadline).")] = 120.0,
    max_body: Annotated[int, typer.Option(
        min=1024, help="Largest request body in bytes; larger ones get 413 before they are read.")] = 1 << 20,
    metrics_public: Annotated[bool, typer.Option(
        "--metrics-public", help="Serve /metrics without a key (by default it needs a key with models ['*'] or "
                                 "metrics: true, when keys are configured).")] = False,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="A Host header to accept besides localhost (repeatable), e.g. the name clients use; without keys "
             "every other Host is refused (DNS rebinding).")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for the model (default: the cores available minus one, for the event loop).")] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Serve the registry's models with the OpenAI API: `model` is NAME (production), NAME@candidate
    or NAME@3; /v1/chat/completions, /v1/completions, /v1/models, /v1/feedback, /healthz, /metrics.
    Without a valid key /healthz says only "ok". Every response is counted in /metrics by status and
    logged (stderr) with its request id (X-Request-Id)."""
    require_extra("serve", "tuneline serve")
    import uvicorn

    from tuneline.serve import build_app, load_keys  # lazy: fastapi and torch at --help time
    from tuneline.serve.keys import key_fingerprints  # lazy: as above

    loaded = load_keys(keys)
    if loaded is None and not no_auth:
        raise TunelineError(Problem("no API keys configured", field="--keys",
                                    hint="pass --keys FILE, set TUNELINE_API_KEYS=key=model1,model2, or --no-auth"))
    ws = Workspace.at(workspace)
    fingerprints = key_fingerprints(loaded)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    serve_log = logging.getLogger("tuneline.serve")
    serve_log.addHandler(handler)
    serve_log.setLevel(logging.INFO)
    app = build_app(workspace, keys=loaded, log_url=log_url, base=base, max_batch=max_batch, max_queue=max_queue,
                    request_timeout=request_timeout or None, max_body_bytes=max_body, metrics_public=metrics_public,
                    allowed_hosts=list(allowed_host or []), threads=threads)
    err_console.print(f"serving on http://{host}:{port}/v1 ({'no auth' if loaded is None else f'{len(loaded)} keys'})")
    _audit_start(ws, fingerprints, {"host": host, "port": port, "auth": loaded is not None})
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        record(ws, "serve.stop", subject="server", details={"host": host, "port": port})
        app.state.engine.close()
        close = getattr(app.state.request_log, "close", None)
        if close is not None:
            close()  # what the request log still holds is written (or spooled) before exit


def _audit_start(ws: Workspace, fingerprints: dict[str, str], details: dict[str, object]) -> None:
    """Audit the start, and first the key changes since the last start (names only, never keys)."""
    from tuneline.serve.keys import key_changes  # lazy: the serve package pulls fastapi

    trail = trail_of(ws)
    try:
        started = trail.entries(action="serve.start")
        before = started[-1].details.get("keys", {}) if started else {}
        if started and (changes := key_changes(before, fingerprints)):
            trail.append("keys.change", subject="server", details=changes)
        trail.append("serve.start", subject="server", details={**details, "keys": fingerprints})
    finally:
        trail.close()
