"""The server's settings: :class:`ServerConfig`, what ``create_app`` is given besides the engine
and the request log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.registry import VersionInfo
from tuneline.serve.keys import Key


@dataclass
class ServerConfig:
    registry_uri: str
    # token -> Key, or Keys carrying their sha256 (a keys file); None: no authentication
    keys: dict[str, Key] | list[Key] | None
    default_max_tokens: int = 128
    resolve: Callable[[str], VersionInfo] | None = None  # ref -> VersionInfo (default: the registry)
    base_name: str = "base"
    adapters_path: Callable[[VersionInfo], str] | None = None  # VersionInfo -> local adapter folder (default: download)
    adapter_cache: Path | None = None  # downloads kept by tree hash across restarts (build_app: the workspace's)
    list_versions: Callable[[], list[VersionInfo]] | None = None  # every VersionInfo, for /v1/models (default: registry)
    max_queue: int = 64  # requests admitted beyond a batch being generated; more get 429
    request_timeout: float | None = 120.0  # seconds from arrival to the last token; None: no deadline
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    metrics_public: bool = False  # /metrics without a key (when keys are configured)
    allowed_hosts: list[str] = field(default_factory=list)  # Host headers accepted besides localhost
    retry_after_s: int = 1  # the Retry-After of a 429
    extra: dict[str, Any] = field(default_factory=dict)  # free-form settings for extensions
