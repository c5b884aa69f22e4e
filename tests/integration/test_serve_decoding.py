"""The server answers as the evaluated model did (issue 17, point 4): an adapter's decoding.json
(beams, repetition penalty, no-repeat n-grams, stop strings, token limit) is applied to its
requests, so the served answer equals generate_detailed's for the same prompt; requests may set
their own token limit and stop strings; jobs with other settings are never batched together.

Random LoRA adapters on the tiny model, served through a stand-in registry (no training run)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import tiny_engine, uvicorn_on_loopback

from tuneline.data.examples import Example
from tuneline.eval.generate import Decoding, GenerateOptions, generate_detailed
from tuneline.registry import VersionInfo
from tuneline.serve import RequestLog, ServerConfig
from tuneline.serve.app import create_app

MESSAGES = [{"role": "user", "content": "hello"}]
EXAMPLE = Example("q", (*MESSAGES, {"role": "assistant", "content": "x"}), "x")
SETTINGS = {"greedy": {"max_new_tokens": 12, "repetition_penalty": 3.0, "no_repeat_ngram_size": 2},
            "beams": {"max_new_tokens": 12, "num_beams": 2, "repetition_penalty": 3.0, "no_repeat_ngram_size": 2}}


def _evaluated(adapter: Path, tiny_model_dir: Path, decoding: Decoding, example: Example = EXAMPLE) -> Any:
    """generate_detailed's answer with the adapter, as evaluation runs it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(adapter))
    return generate_detailed(model, AutoTokenizer.from_pretrained(tiny_model_dir), [example], GenerateOptions(
        batch_size=4, decoding=decoding, autocast=nullcontext(), show_progress=False))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """``plain`` (no decoding.json), ``greedy`` and ``beams`` (the same weights with decoding.json,
    whose stop string occurs in the middle of the uncut answer), and ``other`` (other weights, beams)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("decoding-adapters")
    for seed, name in ((1, "plain"), (2, "other")):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(root / name)
    out: dict[str, Any] = {"plain": root / "plain", "uncut": {}}
    for name, settings in SETTINGS.items():
        uncut = _evaluated(root / "plain", tiny_model_dir, Decoding.of(settings)).texts[0]
        stop = uncut[len(uncut) // 2: len(uncut) // 2 + 3]
        assert stop.strip(), uncut
        shutil.copytree(root / "plain", root / name)
        (root / name / "decoding.json").write_text(json.dumps({**settings, "stop": [stop]}))
        out[name], out["uncut"][name] = root / name, uncut
    out["greedy_plain"] = _evaluated(root / "plain", tiny_model_dir, Decoding(max_new_tokens=12)).texts[0]
    (root / "other" / "decoding.json").write_text(json.dumps(SETTINGS["beams"]))
    out["other"] = root / "other"
    return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    with tiny_engine(tiny_model_dir, max_batch=8) as eng:
        yield eng


@contextlib.contextmanager
def serve(engine: Any, adapters: dict[str, Any], tmp_path: Path, **config: Any) -> Iterator[str]:
    versions = {name: VersionInfo(name, 1, None, str(adapters[name]), "", tags={})
                for name in ("plain", "greedy", "beams", "other")}
    app = create_app(engine, RequestLog(f"sqlite:///{tmp_path / 'requests.db'}"),
                     ServerConfig(registry_uri="unused", keys=None, resolve=versions.__getitem__,
                                  adapters_path=lambda info: info.source, list_versions=lambda: [], **config))
    with uvicorn_on_loopback(app) as url:
        yield url


def _chat(url: str, model: str, **kw: Any) -> dict[str, Any]:
    r = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": MESSAGES, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _answer(body: dict[str, Any]) -> tuple[str, str, int]:
    choice = body["choices"][0]
    return choice["message"]["content"].strip(), choice["finish_reason"], body["usage"]["completion_tokens"]


@pytest.mark.parametrize("name", ["greedy", "beams"])
def test_the_served_answer_is_the_evaluated_answer(engine, adapters, tmp_path, tiny_model_dir, name):
    saved = json.loads((adapters[name] / "decoding.json").read_text())
    evaluated = _evaluated(adapters["plain"], tiny_model_dir, Decoding.of(saved))
    with serve(engine, adapters, tmp_path) as url:
        served = _answer(_chat(url, name))  # no max_tokens, no stop: the adapter's
        streamed = httpx.post(url + "/v1/chat/completions", timeout=120,
                              json={"model": name, "messages": MESSAGES, "stream": True}).text
    assert served == (evaluated.texts[0], "stop", evaluated.tokens[0])
    # the stop string cut the answer: evaluation and serving alike mark it stopped
    uncut = adapters["uncut"][name]
    assert uncut != adapters["greedy_plain"]  # the settings matter for this prompt
    assert evaluated.stopped[0] and served[0] == uncut[:uncut.index(saved["stop"][0])].strip() != uncut
    pieces = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces).strip() == served[0]


def test_a_request_sets_its_own_token_limit_and_stop_strings(engine, adapters, tmp_path, tiny_model_dir):
    with serve(engine, adapters, tmp_path, default_max_tokens=5) as url:
        short = _answer(_chat(url, "greedy", max_tokens=3))
        own_stop = _answer(_chat(url, "greedy", stop=["@@never@@"]))
        plain = _answer(_chat(url, "plain"))  # no decoding.json: today's behaviour (default_max_tokens)
    assert short[2] <= 3 and (short[1] == "length") == (short[2] == 3)
    # the request's stop strings replace the adapter's: its penalties stay, its answer is not cut
    evaluated = _evaluated(adapters["plain"], tiny_model_dir, Decoding.of(SETTINGS["greedy"]))
    assert own_stop == _as_served(evaluated) and own_stop[0] == adapters["uncut"]["greedy"]
    assert plain == _as_served(_evaluated(adapters["plain"], tiny_model_dir, Decoding(max_new_tokens=5)))
    assert plain[2] <= 5


def _as_served(gen: Any) -> tuple[str, str, int]:
    return gen.texts[0], "stop" if gen.stopped[0] else "length", gen.tokens[0]


def _prompt(tok: Any, text: str) -> list[int]:
    return tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def _together(eng: Any, jobs: list[Any]) -> list[str]:
    """Enqueue ``jobs`` at once (the worker takes what it may batch together) and wait for them."""
    with eng._queue.mutex:
        eng._queue.queue.extend(jobs)
        eng._queue.unfinished_tasks += len(jobs)
        eng._queue.not_empty.notify()
    return [j.future.result(timeout=120).text for j in jobs]


def test_jobs_with_other_settings_are_not_batched_together(engine, adapters):
    from tuneline.serve import Job

    eng = engine
    slot = eng.adapter_for("plain@1", str(adapters["plain"]))
    card, hello = _prompt(eng.tokenizer, "my card has not arrived"), _prompt(eng.tokenizer, "hello")
    # the two plain jobs may share a generate call; the beam and the penalized job may not
    rows = [(card, {}), (card, {"num_beams": 2}), (hello, {}), (hello, {"repetition_penalty": 3.0})]
    alone = [eng.submit(Job(p, slot, 10, **s)).result(timeout=120).text for p, s in rows]
    assert alone[0] != alone[1] and alone[2] != alone[3]  # each setting changes the answer
    calls = len(eng.batch_sizes)
    assert _together(eng, [Job(p, slot, 10, **s) for p, s in rows]) == alone
    assert sorted(list(eng.batch_sizes)[calls:]) == [1, 1, 2]


def test_beam_jobs_of_two_adapters_batch_together_as_alone(engine, adapters):
    """The multi-LoRA adapter index is repeated per beam, as generate expands the rows."""
    from tuneline.serve import Job

    eng = engine
    slots = [eng.adapter_for(f"{n}@1", str(adapters[n])) for n in ("plain", "other")]
    prompts = [_prompt(eng.tokenizer, t) for t in ("my card has not arrived", "what is the exchange rate?")]
    rows = [(p, s) for p in prompts for s in slots]
    alone = [eng.submit(Job(p, s, 8, num_beams=2)).result(timeout=120).text for p, s in rows]
    assert len(set(alone)) == len(rows)
    calls = len(eng.batch_sizes)
    assert _together(eng, [Job(p, s, 8, num_beams=2) for p, s in rows]) == alone
    assert list(eng.batch_sizes)[calls:] == [len(rows)]
