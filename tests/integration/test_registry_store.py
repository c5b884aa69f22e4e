"""Registry store, no model needed: gate results stay with the spec they were computed under, a
spec without thresholds is "not gated", and the alias history grows without bound, keeps every
event of concurrent promotions, and still reads the single-tag history of older workspaces."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneline import registry
from tuneline.cli import app
from tuneline.eval.results import EvalSuite, GateResult
from tuneline.registry import RegistryError

SPEC_A, SPEC_B, SPEC_C = "a" * 64, "b" * 64, "c" * 64


def _suite(*gates: tuple[str, bool]) -> EvalSuite:
    return EvalSuite(spec="acme-support", task="classification", primary="accuracy", created="", sets=[],
                     gates=[GateResult(expr, 0.5, 0.0, ok, 0.0) for expr, ok in gates])


def _register(uri: str, model: str, suite: EvalSuite | None, spec_sha: str = SPEC_A, run_id: str | None = None) -> int:
    """A new version of ``model`` (named after its test: the tests share one store)."""
    tags = registry.version_tags(spec_sha256=spec_sha, dataset_version=None, code_version="test",
                                 base_model="tiny", base_fingerprint="f" * 64, suite=suite)
    return registry.register_version(uri, model, run_id, "file:///nowhere/adapter", tags)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module (creating MLflow's tables takes seconds); each test has its own model."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture
def model(request: pytest.FixtureRequest) -> str:
    return request.node.name.removeprefix("test_")[:60].replace("_", "-")


def _run_id(uri: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.create_run("0").info.run_id  # in the default experiment


def _cli(uri: str, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--uri", uri], env={"COLUMNS": "250"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_a_re_evaluation_under_an_edited_spec_does_not_unlock_promotion(uri: str, model: str):
    run_id = _run_id(uri)
    v = _register(uri, model, _suite(("accuracy >= 0.9", False)), SPEC_A, run_id)
    # the attack: `tuneline eval` with the spec's threshold loosened, then with it dropped
    assert registry.update_eval_tags(uri, run_id, _suite(("accuracy >= 0.0", True)), SPEC_B) == [(v, False)]
    assert registry.update_eval_tags(uri, run_id, _suite(), SPEC_C) == [(v, False)]

    info = registry.get_version(uri, model, v)
    assert info.gate_state == "failed" and info.gates_passed is False
    assert info.gates_failed == "accuracy >= 0.9"
    assert {(r["spec_sha256"], r["gate_state"]) for r in info.reevaluations} == {(SPEC_B, "passed"),
                                                                                (SPEC_C, "not gated")}
    with pytest.raises(RegistryError, match=r"gates failed \(accuracy >= 0.9\); re-evaluations under other specs "
                                            r"\(.*\) do not count"):
        registry.promote(uri, model, v)
    with pytest.raises(RegistryError, match="cannot be promoted"):
        CliRunner().invoke(app, ["promote", model, str(v), "--uri", uri], catch_exceptions=False)
    assert registry.resolve(uri, f"{model}@candidate").version == v
    with pytest.raises(RegistryError, match="no 'production' version"):
        registry.resolve(uri, model)
    assert [e["action"] for e in registry.history(uri, model)] == ["register"]

    # a forced promotion is recorded as forced past failed gates, never as "gates passed"
    registry.promote(uri, model, v, force=True, reason="incident 42: accepted by the on-call lead")
    last = registry.history(uri, model)[-1]
    assert (last["forced"], last["gates"], last["reason"]) == (True, "failed", "incident 42: accepted by the on-call lead")
    assert not any(e["reason"] == "gates passed" for e in registry.history(uri, model))

    rows = json.loads(_cli(uri, "models", model, "--json"))
    assert [(r["version"], r["gate_state"], len(r["reevaluations"])) for r in rows] == [(v, "failed", 2)]
    table = _cli(uri, "models", model)
    assert "failed accuracy >= 0.9" in table and f"re-evaluated under spec {SPEC_B[:12]}: passed" in table
    chain = registry.lineage(uri, "/nowhere", model, v)
    assert chain["eval"]["gate_state"] == "failed" and chain["eval"]["spec_sha256"] == SPEC_A
    assert len(chain["eval"]["reevaluations"]) == 2


def test_a_re_evaluation_under_the_same_spec_updates_the_gates(uri: str, model: str):
    run_id = _run_id(uri)
    v = _register(uri, model, _suite(("accuracy >= 0.9", False)), SPEC_A, run_id)
    assert registry.update_eval_tags(uri, run_id, _suite(("accuracy >= 0.9", True)), SPEC_A) == [(v, True)]
    info = registry.get_version(uri, model, v)
    assert (info.gate_state, info.reevaluations) == ("passed", [])
    registry.promote(uri, model, v)
    last = registry.history(uri, model)[-1]
    assert (last["reason"], last["forced"], last["gates"]) == ("gates passed", False, "passed")


def test_a_version_whose_spec_has_no_thresholds_is_not_gated(uri: str, model: str):
    v = _register(uri, model, _suite())
    info = registry.get_version(uri, model, v)
    assert (info.gate_state, info.gates_passed) == ("not gated", None)
    assert info.tags["tuneline.gates_passed"] == "false"  # older readers of this tag refuse it too
    with pytest.raises(RegistryError, match=r"it is not gated \(its spec has no objective.thresholds\)"):
        registry.promote(uri, model, v)
    with pytest.raises(RegistryError, match="--force needs --reason"):
        registry.promote(uri, model, v, force=True)
    result = CliRunner().invoke(app, ["promote", model, str(v), "--force", "--reason", "pilot", "--uri", uri],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "forced: gates not gated" in result.output
    last = registry.history(uri, model)[-1]
    assert (last["forced"], last["gates"], last["reason"]) == (True, "not gated", "pilot")
    assert "not gated" in _cli(uri, "models", model)
    unevaluated = _register(uri, model, None)
    with pytest.raises(RegistryError, match="its gates were not evaluated"):
        registry.promote(uri, model, unevaluated)


def test_a_hundred_promotions_and_rollbacks_keep_every_event_and_roll_back_in_order(uri: str, model: str):
    from mlflow import MlflowClient
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModelTag

    versions = [_register(uri, model, _suite(("accuracy >= 0.5", True))) for _ in range(4)]
    rng = random.Random(0)
    stack: list[int] = []  # production versions in the order they took over
    expected: list[tuple[str, int]] = []
    for _ in range(100):
        if len(stack) >= 2 and rng.random() < 0.4:
            assert registry.rollback(uri, model) == (stack[-1], stack[-2])
            stack.pop()
            expected.append(("rollback", stack[-1]))
        else:
            v = rng.choice(versions)
            registry.promote(uri, model, v)
            stack.append(v)
            expected.append(("promote", v))
    events = registry.history(uri, model)
    assert [(e["action"], e["version"]) for e in events if e["alias"] == "production"] == expected
    assert len(events) == 4 + 100  # the registrations, then every move
    # no single tag grows with the history: each stays within the width MLflow's SQL schema gives a
    # registered-model tag (PostgreSQL and MySQL enforce it; one tag for all of it broke after ~34 moves)
    width = SqlRegisteredModelTag.__table__.c.value.type.length
    assert max(len(v) for v in MlflowClient(tracking_uri=uri).get_registered_model(model).tags.values()) <= width
    assert _register(uri, model, _suite(("accuracy >= 0.5", True))) == 5  # `tuneline run` still registers
    while len(stack) >= 2:
        assert registry.rollback(uri, model) == (stack[-1], stack[-2])
        stack.pop()
        assert registry.resolve(uri, model).version == stack[-1]
    with pytest.raises(RegistryError, match="no earlier production version"):
        registry.rollback(uri, model)


def test_the_single_tag_history_of_an_older_workspace_is_still_read(uri: str, model: str):
    from mlflow import MlflowClient

    v1, v2, v3 = (_register(uri, model, _suite(("accuracy >= 0.5", True))) for _ in range(3))
    client = MlflowClient(tracking_uri=uri)
    for key in [k for k in client.get_registered_model(model).tags if k.startswith(registry.HISTORY_PREFIX)]:
        client.delete_registered_model_tag(model, key)  # as an older tuneline left it: one JSON tag
    old = [{"action": "promote", "alias": "production", "version": v, "at": f"2025-01-0{v}T00:00:00Z", "by": "ops",
            "reason": "gates passed", "forced": False} for v in (v1, v2)]
    client.set_registered_model_tag(model, registry.HISTORY_TAG, json.dumps(old))
    client.set_registered_model_alias(model, "production", str(v2))
    registry.promote(uri, model, v3)
    assert [(e["version"], e["by"]) for e in registry.history(uri, model)][:2] == [(v1, "ops"), (v2, "ops")]
    assert registry.rollback(uri, model) == (v3, v2)
    assert registry.rollback(uri, model) == (v2, v1)
    assert registry.resolve(uri, model).version == v1
    held = registry.lineage(uri, "/nowhere", model, v2)["aliases_held"]
    assert [(h["alias"], h["how"]) for h in held] == [("production", "promote"), ("production", "rollback")]


def test_two_processes_promoting_at_once_lose_no_event(uri: str, model: str, tmp_path: Path):
    versions = [_register(uri, model, _suite(("accuracy >= 0.5", True))) for _ in range(2)]
    script = tmp_path / "promote.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from tuneline import registry
        who = sys.argv[1]
        print("ready", flush=True)
        sys.stdin.readline()  # start together
        for i in range(25):
            registry.promote({uri!r}, {model!r}, {versions}[i % 2], force=True, reason=f"{{who}} {{i}}")
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(registry.__file__).parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), who], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, text=True) for who in ("p", "q")]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:  # both are imported and waiting: let them go
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    events = [e for e in registry.history(uri, model) if e["action"] == "promote"]
    assert len(events) == 50
    for who in ("p", "q"):  # each process's moves, all there and in the order it made them
        assert [e["reason"] for e in events if e["reason"].startswith(who)] == [f"{who} {i}" for i in range(25)]
    assert registry.resolve(uri, model).version == events[-1]["version"]  # the alias is where the last event says


def test_an_alias_moves_only_while_holding_the_stores_lock(uri: str, model: str):
    import threading

    v = _register(uri, model, _suite(("accuracy >= 0.5", True)))
    assert registry.lock_path(uri) == Path(uri.removeprefix("sqlite:///") + ".registry.lock")
    assert registry.lock_path("file:///srv/mlruns") == Path("/srv/mlruns/.tuneline-registry.lock")
    remote = registry.lock_path("https://mlflow.example.com")
    assert remote.parent == Path.home() / ".cache" / "tuneline" / "registry-locks"
    done = threading.Event()
    with registry._locked(uri):  # another process's promotion or rollback in progress
        worker = threading.Thread(target=lambda: (registry.promote(uri, model, v), done.set()))
        worker.start()
        assert not done.wait(2.0)  # waits for the lock instead of interleaving its read and write
        assert [e["alias"] for e in registry.history(uri, model)] == ["candidate"]
    worker.join(60)
    assert done.is_set() and registry.resolve(uri, model).version == v
