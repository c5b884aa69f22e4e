"""`tuneline run` with `train.lora.layers`: the frozen layers' states computed for one run are kept in
the workspace (`stems/`), and a later run on the same rows and base model with another learning rate
reads them instead of computing them again."""

from __future__ import annotations

import logging
from pathlib import Path

from helpers import tiny_lora_spec

import tuneline
from tuneline.workspace import Workspace

TRAIN = "{method: lora, lr: LR, epochs: 2, batch_size: 8, seq_len: 96, precision: fp32, seed: 0, lora: {layers: 1}}"


def test_a_run_with_another_learning_rate_reads_the_stored_frozen_layer_states(tmp_path: Path, tiny_model_dir: Path,
                                                                               caplog) -> None:
    spec = tiny_lora_spec(tmp_path, tiny_model_dir, "stems", train=TRAIN.replace("LR", "3.0e-2"),
                          extra="baseline: {enabled: false}")
    ws = Workspace.at(tmp_path / "ws")
    with caplog.at_level(logging.INFO, logger="tuneline.train.stem"):
        first = tuneline.run(spec, workspace=ws, show_progress=False)
    assert "computed the 1 frozen decoder layers once for 21 examples" in caplog.text  # 24 rows, 3 held out
    assert len(list(ws.stems_dir.glob("stem-*.safetensors"))) == 1
    caplog.clear()

    spec.write_text(spec.read_text().replace("lr: 3.0e-2", "lr: 1.0e-2"))
    with caplog.at_level(logging.INFO, logger="tuneline.train.stem"):
        second = tuneline.run(spec, workspace=ws, show_progress=False)
    assert "read the 1 frozen decoder layers' states of 21 examples" in caplog.text
    assert "computed the" not in caplog.text
    assert second.train.steps == first.train.steps and second.train.final_loss != first.train.final_loss
    assert len(list(ws.stems_dir.glob("stem-*.safetensors"))) == 1  # the same rows and model: the same file
