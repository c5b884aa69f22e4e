"""Serving: an OpenAI-compatible server with one base model in memory and the registry's adapters.

``build_app(...)`` returns the FastAPI app (tests drive it in-process or under uvicorn);
``tuneline serve`` runs it under uvicorn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneline.errors import Problem, TunelineError
from tuneline.serve.app import ApiError, Key, ServerConfig, create_app
from tuneline.serve.engine import Engine, Job, Result
from tuneline.serve.requestlog import RequestLog

__all__ = ["ApiError", "Engine", "Job", "Key", "RequestLog", "Result", "ServerConfig", "build_app", "load_keys"]

KEYS_ENV = "TUNELINE_API_KEYS"


def load_keys(path: str | Path | None) -> dict[str, Key] | None:
    """API keys from a file (JSON or YAML: ``keys: [{name, key, models: [NAME, ...] or ["*"]}]``) or,
    without one, from ``$TUNELINE_API_KEYS`` (``key=model1,model2;key2=*``). None when neither is set."""
    if path is not None:
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise TunelineError(Problem(f"cannot read API keys: {exc}", where=str(p),
                                        hint="a YAML or JSON file: keys: [{name: team-a, key: sk-..., models: ['*']}]")) from exc
        keys: dict[str, Key] = {}
        for i, entry in enumerate((data or {}).get("keys", []) if isinstance(data, dict) else []):
            if not isinstance(entry, dict) or not entry.get("key") or not entry.get("models"):
                raise TunelineError(Problem(f"entry {i} needs `key` and `models`", where=str(p), field=f"keys.{i}"))
            keys[str(entry["key"])] = Key(str(entry.get("name") or f"key{i}"), {str(m) for m in entry["models"]})
        if not keys:
            raise TunelineError(Problem("no keys in the file", where=str(p), hint="list them under `keys:`"))
        return keys
    env = os.environ.get(KEYS_ENV, "").strip()
    if not env:
        return None
    keys = {}
    for i, part in enumerate(p for p in env.split(";") if p.strip()):
        token, _, models = part.partition("=")
        if not token.strip() or not models.strip():
            raise TunelineError(Problem(f"{KEYS_ENV} entry {i} is not key=model1,model2", field=KEYS_ENV))
        keys[token.strip()] = Key(f"env{i}", {m.strip() for m in models.split(",") if m.strip()})
    return keys


def build_app(workspace: Any = None, *, keys: dict[str, Key] | None, log_url: str | None = None,
              base: str | None = None, max_batch: int = 8, resolve_ttl: float = 1.0) -> Any:
    """The app for the workspace's registry: the base model loaded once, adapters on demand."""
    from tuneline import registry
    from tuneline.models import load_model, load_tokenizer, resolve_model_source
    from tuneline.train import default_device, resolve_precision
    from tuneline.train.loop import autocast_for
    from tuneline.workspace import Workspace

    ws = workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)
    if base is None:
        bases = {v.tags.get("tuneline.base_model") for v in registry.list_versions(ws.tracking_uri)} - {None}
        if len(bases) > 1:
            raise TunelineError(Problem(f"registered models use different base models {sorted(map(str, bases))}",
                                        hint="one server holds one base model: pass --base"))
        base = next(iter(bases), None) or "smollm2-135m"
    source = resolve_model_source(str(base), Path.cwd())
    device = default_device()
    precision = resolve_precision("auto", device)
    model = load_model(source, ws.models_dir, device=device, dtype="bf16" if precision == "bf16" else "fp32")
    tokenizer = load_tokenizer(source, ws.models_dir)
    engine = Engine(model, tokenizer, max_batch=max_batch, resolve_ttl=resolve_ttl,
                    autocast=autocast_for(precision, device))
    log = RequestLog(log_url or f"sqlite:///{ws.root / 'requests.db'}")
    app = create_app(engine, log, ServerConfig(registry_uri=ws.tracking_uri, keys=keys, base_name=str(base)))
    app.state.engine = engine
    app.state.request_log = log
    return app
