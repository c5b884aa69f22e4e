"""bf16 where the hardware runs it fast, fp32 elsewhere; an explicit choice is honoured."""

from __future__ import annotations

import pytest

from tuneline.runtime import compute as precision


@pytest.mark.parametrize(("fast_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_the_cpu(monkeypatch, fast_bf16: bool, expected: str):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert precision.resolve_precision("auto", "cpu") == expected


def test_explicit_precision_is_kept(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_precision("fp32", "cpu") == "fp32"


def test_cpu_flag_detection_reads_cpuinfo(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    monkeypatch.setattr(precision, "Path", lambda _: fake)
    precision.cpu_has_fast_bf16.cache_clear()
    try:
        assert precision.cpu_has_fast_bf16() is False
        fake.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_bf16\n")
        precision.cpu_has_fast_bf16.cache_clear()
        assert precision.cpu_has_fast_bf16() is True
    finally:
        precision.cpu_has_fast_bf16.cache_clear()


@pytest.mark.parametrize(("method", "fast_bf16", "base_dtype"),
                         [("lora", True, "bf16"), ("full", True, "fp32"), ("lora", False, "fp32")])
def test_base_weights_are_bf16_only_for_adapters_computed_in_bf16(monkeypatch, method, fast_bf16, base_dtype):
    # full fine-tuning updates the base weights themselves: they stay fp32 master weights
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    c = precision.Compute.resolve("auto", method, device="cpu")
    assert (c.device, c.precision, c.base_dtype) == ("cpu", "bf16" if fast_bf16 else "fp32", base_dtype)
