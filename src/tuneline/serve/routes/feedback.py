"""``POST /v1/feedback``: a rating and/or correction of a logged response, stored in the request log."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request

from tuneline.monitor.store import RequestLogError
from tuneline.serve.auth import authorize
from tuneline.serve.errors import ApiError
from tuneline.serve.schema import FeedbackAck, FeedbackRequest
from tuneline.serve.state import Server

log = logging.getLogger("tuneline.serve")

router = APIRouter()


@router.post("/v1/feedback", response_model=None)
async def feedback(request: Request, body: FeedbackRequest, server: Server) -> FeedbackAck:
    authorize(server.keys, request, None)
    if body.rating is None and body.correction is None:
        raise ApiError(400, "send a rating, a correction, or both", "invalid_request_error", "rating")
    loop = asyncio.get_running_loop()
    store = server.request_log
    try:
        if not await loop.run_in_executor(None, store.exists, body.response_id):
            raise ApiError(404, f"no logged response {body.response_id!r}", "invalid_request_error",
                           "response_id", "response_not_found")
        fid = await loop.run_in_executor(None, store.add_feedback, body.response_id, body.rating,
                                         body.correction, body.comment)
    except RequestLogError as exc:  # the store is down: the client may retry, nothing was recorded
        log.error("feedback for %s not stored: %s", body.response_id, exc)
        raise ApiError(503, "the request log is unavailable; feedback was not stored, retry later",
                       "server_error", code="request_log_unavailable") from exc
    return {"id": fid, "object": "feedback", "response_id": body.response_id}
