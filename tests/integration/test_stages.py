"""The stages of a run use the one training configuration in scope: after a search, the best trial's
(not the spec's ``train`` section) decides the base weights' dtype and what the run reports."""

from __future__ import annotations

import io
import json
from pathlib import Path

from helpers import tiny_lora_spec


def test_a_search_that_picks_full_fine_tuning_trains_fp32_weights_and_reports_its_seq_len(
        tmp_path: Path, tiny_model_dir: Path):
    from rich.console import Console
    from safetensors import safe_open

    from tuneline.pipeline import run

    # the spec says LoRA computed in bf16 at seq_len 96; its search can only pick full fine-tuning at 20
    spec = tiny_lora_spec(
        tmp_path, tiny_model_dir, "stages-full", per_label=6,
        train="{method: lora, lr: 1.0e-3, max_steps: 2, batch_size: 8, seq_len: 96, precision: bf16, seed: 0}",
        extra="""
        curation: {split: {validation: 0.25}}
        baseline: {enabled: false}
        search:
          trials: 1
          metric: eval_loss
          space:
            method: {type: categorical, choices: [full]}
            seq_len: {type: categorical, choices: [36]}
          pruner: {type: none}
        """)
    out = io.StringIO()
    result = run(spec, workspace=tmp_path / "ws", show_progress=False, console=Console(file=out, width=300))
    saved = Path(result.train.adapter_dir)
    assert (saved / "config.json").is_file() and not (saved / "adapter_config.json").exists()  # a whole model
    # full fine-tuning updates the base weights: they stay fp32 master weights, not the bf16 copy an
    # adapter computed in bf16 would freeze
    dtypes = set()
    for file in saved.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 - not a dict
    assert dtypes == {"F32"}, dtypes
    # rows longer than the seq_len that trained were dropped, and the run says which seq_len that was
    assert result.train.dropped_too_long > 0
    printed = out.getvalue()
    assert f"dropped {result.train.dropped_too_long} training examples longer than train.seq_len=36" in printed
    assert "seq_len=96" not in printed
    trained = json.loads((tmp_path / "ws" / "runs" / "stages-full" / "run.json").read_text())
    assert trained["fingerprint"]  # the plan's fingerprint is recorded for --resume
