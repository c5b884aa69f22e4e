"""Order rules of a run that are code: a model handed from one stage to the next is taken once."""

from __future__ import annotations

import pytest

from tuneline.pipeline.stages import Untouched


def test_the_scored_base_model_is_handed_to_training_once():
    model = object()
    untouched = Untouched(model, None, scored_base=True, baselines=None)  # type: ignore[arg-type]
    assert untouched.take() is model
    # a second stage cannot train (or evaluate) the same model object again by mistake
    with pytest.raises(RuntimeError, match="already handed over"):
        untouched.take()
