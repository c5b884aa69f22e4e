"""`train.distributed`: ddp by default; fsdp only where it means something (full fine-tuning,
without rank-0 validation), refused in the spec with the field named, before any process starts."""

from __future__ import annotations

from pathlib import Path

from helpers import spec_error

from tuneline.spec import parse_spec

BODY = ("name: x\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: smollm2-135m\n"
        "data: {train: {path: train.csv}}\n")


def test_ddp_is_the_default_and_fsdp_shards_full_fine_tuning() -> None:
    assert parse_spec(BODY, "spec.yaml").train.distributed.strategy == "ddp"
    spec = parse_spec(BODY + "train: {method: full, distributed: {strategy: fsdp}}\n", "spec.yaml")
    assert spec.train.distributed.strategy == "fsdp"


def test_fsdp_for_an_adapter_or_with_early_stopping_is_refused_naming_the_field(tmp_path: Path) -> None:
    text = spec_error(tmp_path, "train: {method: lora, distributed: {strategy: fsdp}}")
    assert "train" in text and "fsdp shards full fine-tuning; method 'lora' trains an adapter" in text
    text = spec_error(tmp_path, "train: {method: full, distributed: {strategy: fsdp}, "
                                "early_stopping: {metric: accuracy, every: 5}}")
    assert "early_stopping validates on rank 0 alone" in text
    assert "strategy" in spec_error(tmp_path, "train: {distributed: {strategy: zero3}}")


def test_ray_training_defaults_to_two_workers_of_one_cpu() -> None:
    assert parse_spec(BODY, "spec.yaml").train.backend == "local"
    ray = parse_spec(BODY + "train: {backend: ray}\n", "spec.yaml").train.ray
    assert (ray.address, ray.workers, ray.cpus_per_worker, ray.gpus_per_worker, ray.max_failures) == (None, 2, 1, 0, 2)


def test_what_ray_cannot_train_is_refused_naming_the_field(tmp_path: Path) -> None:
    import pytest

    from tuneline.errors import SpecError

    text = spec_error(tmp_path, "train: {method: dpo, backend: ray}")
    assert "train.backend: dpo's preference phase trains in one process" in text
    with pytest.raises(SpecError, match=r"train.backend: head 'classifier' trains in one process"):
        parse_spec(BODY.replace("classification}", "classification, head: classifier}")
                   + "train: {backend: ray}\n", "spec.yaml")
    assert "workers" in spec_error(tmp_path, "train: {backend: ray, ray: {workers: 0}}")
    assert "backend" in spec_error(tmp_path, "train: {backend: slurm}")


def test_the_search_and_the_training_of_a_run_share_one_ray_cluster(tmp_path: Path) -> None:
    search = "search: {space: {lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}}, backend: ray, ray: {address: 'a:6379'}}\n"
    text = spec_error(tmp_path, "train: {backend: ray, ray: {address: 'b:6379'}}\n" + search)
    assert "train.ray.address: 'b:6379' is not the search's cluster ('a:6379')" in text
    for train in ("train: {backend: ray, ray: {address: 'a:6379'}}\n", "train: {backend: ray}\n"):
        assert parse_spec(BODY + train + search, "spec.yaml").train.backend == "ray"


def test_where_training_runs_changes_no_checkpoint_study_or_comparison(tmp_path: Path) -> None:
    """A checkpoint written under one backend (or strategy) resumes under another: the training is the same."""
    from tuneline.curation import PreparedData
    from tuneline.pipeline.stages import run_fingerprint
    from tuneline.spec import load_spec

    def fingerprint(train: str) -> str:
        (tmp_path / "tuneline.yaml").write_text(BODY + train + "\n")
        return run_fingerprint(load_spec(tmp_path / "tuneline.yaml"), PreparedData([], [], [], None), "model")

    local = fingerprint("train: {method: full}")
    assert fingerprint("train: {method: full, backend: ray, ray: {workers: 4, address: 'h:1'}}") == local
    assert fingerprint("train: {method: full, distributed: {strategy: fsdp}}") == local
    assert fingerprint("train: {method: full, lr: 1.0e-3}") != local
