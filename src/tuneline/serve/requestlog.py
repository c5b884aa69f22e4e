"""The request log: every request and response, PII redacted, with model version, latency and
token counts; and feedback (ratings, corrections) on logged responses. SQLite by default, any
SQLAlchemy URL for a team; the monitoring stage reads it."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    select,
)

from tuneline.curation.pii import Redactor

metadata = MetaData()
requests_table = Table(
    "requests", metadata,
    Column("id", String(64), primary_key=True),
    Column("created", Float, nullable=False),
    Column("endpoint", String(64)),
    Column("model", String(200)),  # as requested: NAME, NAME@candidate, NAME@3
    Column("model_name", String(200)),
    Column("model_version", Integer, nullable=True),  # None: the base model
    Column("key_name", String(200), nullable=True),
    Column("prompt", Text),  # JSON, PII redacted
    Column("response", Text, nullable=True),  # PII redacted
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("finish_reason", String(32), nullable=True),
    Column("latency_ms", Float, nullable=True),
    Column("status", Integer),
    Column("pii_redacted", Integer, default=0),
)
feedback_table = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("response_id", String(64), nullable=False, index=True),
    Column("created", Float, nullable=False),
    Column("rating", Integer, nullable=True),
    Column("correction", Text, nullable=True),
    Column("comment", Text, nullable=True),
)


class RequestLog:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        metadata.create_all(self.engine)
        self.redactor = Redactor()
        self._lock = threading.Lock()

    def redact(self, text: str | None) -> tuple[str | None, int]:
        if text is None:
            return None, 0
        new, found = self.redactor.redact(text)
        return new, sum(found.values())

    def log(self, *, id: str, endpoint: str, model: str, model_name: str, model_version: int | None,
            key_name: str | None, prompt: Any, response: str | None, prompt_tokens: int | None,
            completion_tokens: int | None, finish_reason: str | None, latency_ms: float, status: int) -> None:
        prompt_text, n1 = self.redact(json.dumps(prompt, ensure_ascii=False))
        response_text, n2 = self.redact(response)
        row = {"id": id, "created": time.time(), "endpoint": endpoint, "model": model, "model_name": model_name,
               "model_version": model_version, "key_name": key_name, "prompt": prompt_text,
               "response": response_text, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "finish_reason": finish_reason, "latency_ms": latency_ms, "status": status,
               "pii_redacted": n1 + n2}
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(requests_table).values(**row))

    def exists(self, response_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(requests_table.c.id).where(requests_table.c.id == response_id)).first() is not None

    def add_feedback(self, response_id: str, rating: int | None, correction: str | None, comment: str | None) -> int:
        correction, _ = self.redact(correction)
        comment, _ = self.redact(comment)
        with self._lock, self.engine.begin() as conn:
            res = conn.execute(insert(feedback_table).values(
                response_id=response_id, created=time.time(), rating=rating, correction=correction, comment=comment))
            key = res.inserted_primary_key
            assert key is not None
            return int(key[0])

    def rows(self, table: Table = requests_table) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(table))]
