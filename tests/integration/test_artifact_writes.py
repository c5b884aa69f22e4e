"""Adapters and the retrieval index shipped with them are replaced whole: a save that fails
halfway (disk full, a crash) leaves the previous one as it was, never a mix or nothing."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tuneline.artifacts import tree_sha256


def test_a_failed_adapter_save_leaves_the_previous_adapter_whole(classification_spec: Path, tiny_model_dir: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.curation import prepare
    from tuneline.spec import load_spec
    from tuneline.train import TrainOptions, train

    loaded = load_spec(classification_spec)
    cfg = loaded.spec.train.model_copy(update={"method": "lora", "max_steps": 1})
    data = prepare(loaded)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def model() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    _, result = train(cfg, model(), tok, data.train, tmp_path, TrainOptions(fingerprint="fp", show_progress=False))
    adapter = Path(result.adapter_dir)
    before = tree_sha256(adapter)

    def disk_full(folder: Any, *args: Any, **kwargs: Any) -> None:
        (Path(folder) / "tokenizer.json").write_text("{")  # a part written, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg.model_copy(update={"seed": 1}), model(), tok, data.train, tmp_path, TrainOptions(fingerprint="fp",
              show_progress=False))
    assert tree_sha256(adapter) == before  # the previous adapter, whole


def test_shipping_the_index_again_keeps_the_previous_copy_whole_when_it_fails(
        tmp_path: Path, tiny_encoder_dir: Path, monkeypatch: pytest.MonkeyPatch):
    from tuneline.data.examples import Example
    from tuneline.retrieval import build_index
    from tuneline.retrieval.encoder import load_encoder

    rows = [Example(f"t:{i}", ({"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "a"}),
                    "a", "a") for i in range(4)]
    index = build_index(rows, load_encoder(str(tiny_encoder_dir)), tmp_path / "idx")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shipped = index.copy_to(adapter, 2)
    before = tree_sha256(adapter)

    real_copy, copied = shutil.copy2, []

    def copy_then_fail(src: Any, dst: Any, **kwargs: Any) -> Any:
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(dst)
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copy2", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        index.copy_to(adapter, 3)
    assert tree_sha256(adapter) == before  # the first copy (k=2), whole, and nothing left beside it
    assert sorted(p.name for p in adapter.iterdir()) == [shipped.name]
