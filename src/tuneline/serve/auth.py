"""Authentication and scopes: which key a request carries (Bearer token, compared by SHA-256
digest in constant time) and whether that key may call a model. The middleware
(:mod:`tuneline.serve.guard`) checks the key before a body is read; routes call :func:`authorize`
for the model they serve."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from fastapi import Request

from tuneline.serve.errors import ApiError
from tuneline.serve.keys import Key, hash_key


class KeyTable:
    """The configured keys by digest (see :class:`tuneline.serve.ServerConfig` ``keys``)."""

    def __init__(self, keys: dict[str, Key] | list[Key]) -> None:
        self.entries: list[tuple[bytes, Key]] = []
        if isinstance(keys, dict):
            self.entries = [(bytes.fromhex(hash_key(token)), key) for token, key in keys.items()]
            return
        for key in keys:
            if not key.sha256:
                raise ValueError(f"key {key.name!r} has no sha256")
            self.entries.append((bytes.fromhex(key.sha256), key))

    @classmethod
    def of(cls, keys: dict[str, Key] | list[Key] | None) -> KeyTable | None:
        """None without keys: no authentication."""
        return None if keys is None else cls(keys)

    def lookup(self, token: str) -> Key | None:
        """The key whose digest matches, compared in constant time against every key."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, key in self.entries:
            if hmac.compare_digest(digest, known):
                found = key
        return found

    def authenticate(self, headers: Mapping[str, str]) -> Key:
        """The caller's key (``headers`` with lower-case names), or ApiError 401."""
        header = headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                           code="missing_api_key")
        key = self.lookup(token)
        if key is None:
            raise ApiError(401, "invalid API key", "invalid_request_error", code="invalid_api_key")
        return key


def authenticate(keys: KeyTable | None, headers: Mapping[str, str]) -> Key | None:
    """None without keys configured; otherwise the caller's key, or ApiError 401."""
    return None if keys is None else keys.authenticate(headers)


def request_key(keys: KeyTable | None, request: Request) -> Key | None:
    """:func:`authenticate` for a request that reached a route."""
    return authenticate(keys, {k.lower(): v for k, v in request.headers.items()})


def authorize(keys: KeyTable | None, request: Request, ref: str | None) -> Key | None:
    """The request's key, which must allow model ``ref`` (None: any model); ApiError 401 or 403."""
    key = request_key(keys, request)
    if key is not None and ref is not None and not key.allows(ref):
        raise ApiError(403, f"this key may not call model {ref!r}", "permission_error", code="model_not_allowed")
    return key
