"""``tuneline serve``: the OpenAI-compatible server under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    keys: Annotated[Path | None, typer.Option(
        help="API keys file (YAML/JSON: keys: [{name, key, models: [NAME or '*']}]); default: $TUNELINE_API_KEYS.")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys (local experiments only).")] = False,
    log_url: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL of the request log (default: sqlite in the workspace).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the registered models use).")] = None,
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace folder.")] = None,
) -> None:
    """Serve the registry's models with the OpenAI API: `model` is NAME (production), NAME@candidate
    or NAME@3; /v1/chat/completions, /v1/completions, /v1/models, /v1/feedback, /healthz, /metrics."""
    import uvicorn

    from tuneline.errors import Problem, TunelineError
    from tuneline.serve import build_app, load_keys

    loaded = load_keys(keys)
    if loaded is None and not no_auth:
        raise TunelineError(Problem("no API keys configured", field="--keys",
                                    hint="pass --keys FILE, set TUNELINE_API_KEYS=key=model1,model2, or --no-auth"))
    app = build_app(workspace, keys=loaded, log_url=log_url, base=base)
    err_console.print(f"serving on http://{host}:{port}/v1 ({'no auth' if loaded is None else f'{len(loaded)} keys'})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
