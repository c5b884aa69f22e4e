"""Which model a request's ``model`` names: ``NAME`` (its production version), ``NAME@candidate``,
``NAME@3`` or the base model's name, resolved through the registry (cached by the engine for
``resolve_ttl`` seconds) to an adapter slot of the engine, the adapter downloaded once per version."""

from __future__ import annotations

import logging
from typing import NamedTuple

from tuneline import registry
from tuneline.artifacts import ADAPTER_SHA_TAG, ArtifactError
from tuneline.registry import VersionInfo
from tuneline.serve.config import ServerConfig
from tuneline.serve.engine import BASE, Engine
from tuneline.serve.errors import ApiError

log = logging.getLogger("tuneline.serve")


class ResolvedModel(NamedTuple):
    name: str
    version: int | None  # None: the base model
    slot: str  # the engine's adapter slot, or BASE

    @property
    def served(self) -> str:
        """The ``model`` of a response: ``NAME@VERSION``, or the base model's name."""
        return f"{self.name}@{self.version}" if self.version is not None else self.name


class ModelResolver:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self._downloaded: dict[tuple[str, int], str] = {}  # (name, version) -> local adapter folder

    def resolve(self, ref: str) -> ResolvedModel:
        """The model ``ref`` names, its adapter loaded; ApiError 404 for an unknown model, 500 for an
        adapter whose files fail verification. Blocking (registry, download, load): call it off the loop."""
        if ref == self.config.base_name:
            return ResolvedModel(ref.partition("@")[0], None, BASE)
        info = self._version(ref)
        if info.exported_from is not None:
            raise ApiError(404, f"model {ref!r} is an MLflow export of {info.exported_from}, which MLflow serves "
                                f"(`mlflow models serve`); ask for {info.exported_from.replace('/', '@')} here",
                           "invalid_request_error", "model", "model_not_found")
        key = f"{info.name}@{info.version}"
        path = self._adapter_path(info)
        try:
            return ResolvedModel(info.name, info.version,
                                 self.engine.adapter_for(key, path, info.tags.get(ADAPTER_SHA_TAG)))
        except ArtifactError as exc:
            self._downloaded.pop((info.name, info.version), None)
            if self.config.adapter_cache is not None and self.config.adapters_path is None:
                registry.evict_download(self.config.adapter_cache, info)  # fetched again on the next request
            log.error("refused to load %s: %s", key, exc.problems[0].message)
            raise ApiError(500, f"model {ref!r} cannot be served: its adapter failed verification "
                                f"({exc.problems[0].message})", "server_error", "model",
                           "adapter_verification_failed") from exc

    def list_versions(self) -> list[VersionInfo]:
        """Every registered version this server can answer with (for ``/v1/models``). Blocking."""
        found = (self.config.list_versions() if self.config.list_versions is not None
                 else registry.list_versions(self.config.registry_uri))
        return [v for v in found if v.exported_from is None]  # MLflow exports are MLflow's to serve

    def _version(self, ref: str) -> VersionInfo:
        try:
            return self.engine.cached_resolve(ref, self.config.resolve or self._from_registry)
        except registry.RegistryError as exc:
            raise ApiError(404, f"model {ref!r} not found: {exc.problems[0].message}", "invalid_request_error",
                           "model", "model_not_found") from exc
        except Exception as exc:  # the registry could not parse the name (e.g. odd characters)
            raise ApiError(404, f"model {ref!r} not found", "invalid_request_error", "model",
                           "model_not_found") from exc

    def _from_registry(self, ref: str) -> VersionInfo:
        return registry.resolve(self.config.registry_uri, ref)

    def _adapter_path(self, info: VersionInfo) -> str:
        """The adapter's local folder, fetched once per version, not on every request."""
        path = self._downloaded.get((info.name, info.version))
        if path is None:
            path = (self.config.adapters_path(info) if self.config.adapters_path
                    else str(registry.download_adapter(self.config.registry_uri, info, self.config.adapter_cache)))
            self._downloaded[(info.name, info.version)] = path
        return path
