"""The server's route table: every path a router serves has its own label in /metrics and the
log line (a path missing from ``ENDPOINTS`` would be counted as ``other``)."""

from __future__ import annotations

from fastapi.routing import APIRoute

from tuneline.serve.routes import ENDPOINTS, ROUTERS, endpoint_label


def test_every_served_path_has_its_own_metrics_label():
    paths = {route.path for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)}
    assert paths == set(ENDPOINTS)
    assert len(set(ENDPOINTS.values())) == len(ENDPOINTS)
    assert endpoint_label("/v1/unknown") == "other"
