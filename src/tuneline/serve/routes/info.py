"""What the server serves and how it is doing: ``GET /v1/models`` (the models the caller's key
reaches), ``GET /healthz`` and Prometheus ``GET /metrics``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tuneline.serve.auth import authorize, request_key
from tuneline.serve.errors import ApiError
from tuneline.serve.schema import Health, ModelCard, ModelList
from tuneline.serve.state import Server

router = APIRouter()


@router.get("/v1/models", response_model=None)
async def models(request: Request, server: Server) -> ModelList:
    key = authorize(server.keys, request, None)
    base = server.config.base_name
    data = [_card(base)] if key is None or key.allows(base) else []
    for v in await asyncio.get_running_loop().run_in_executor(None, server.models.list_versions):
        if key is not None and not key.allows_name(v.name):
            continue
        ids = [f"{v.name}@{v.version}"] + [f"{v.name}@{a}" for a in v.aliases]
        ids += [v.name] if "production" in v.aliases else []
        data += [_card(i) for i in ids if key is None or key.allows(i)]
    return {"object": "list", "data": data}


@router.get("/healthz", response_model=None)
async def healthz(request: Request, server: Server) -> Health:
    if server.keys is not None:  # without a valid key: only that it is up, not what it serves
        try:
            request_key(server.keys, request)
        except ApiError:
            return {"status": "ok"}
    return {"status": "ok", "adapters_loaded": sorted(server.engine.adapters), "in_flight": server.admission.in_flight,
            "queue_depth": server.engine.waiting()}


@router.get("/metrics", response_model=None)
async def prometheus(server: Server) -> PlainTextResponse:
    # off the event loop: the monitor gauges may read the store
    text = await asyncio.get_running_loop().run_in_executor(None, server.metrics.exposition)
    return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)


def _card(model_id: str) -> ModelCard:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "tuneline"}
