"""Every training method on the tiny model: it trains, a run resumed from its checkpoint ends with
the weights and loss of an uninterrupted one, its saved folder reloads and answers as the model in
memory did, prefix and prompt tuning generate as greedy decoding by forward passes of the peft
model, and the serving engine answers every method's version as evaluation does."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import tiny_lora_spec

from tuneline.curation import prepare
from tuneline.data import Example
from tuneline.data.tokenize import encode_prompt
from tuneline.eval.generate import Decoding, GenerateOptions, generate_detailed
from tuneline.spec import load_spec
from tuneline.spec.methods import TRAIN_METHODS
from tuneline.spec.models import LoraSpec, PromptSpec, TrainSpec
from tuneline.train import TrainOptions, train

NEW_TOKENS = 6
# rows of different lengths: the batch pads them, and each must answer as it would alone
QUESTIONS = ("hi", "my card has not arrived yet, it has been two weeks now, where is it?",
             "what is the exchange rate for euros", "lost card")


# rates that move each method's answers in three steps without collapsing them to one token
LR = {"lora": 5e-3, "dora": 5e-3, "rslora": 2e-3, "ia3": 2e-2, "prefix": 2e-2, "prompt": 2e-2, "full": 2e-3}
# one method per serving path in the default run (batched LoRA, merged, virtual tokens, whole model);
# the others train slower on CPU (DoRA ~10x LoRA) or take a path these already cover
FAST = ("lora", "ia3", "prefix", "full")
METHODS = [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in TRAIN_METHODS]


def _cfg(method: str) -> TrainSpec:
    # three steps, a checkpoint after the second; virtual tokens few (the tiny model's prompts are short)
    return TrainSpec(method=method, lr=LR[method], max_steps=3, batch_size=4, seq_len=64, checkpoint_every=2,
                     precision="fp32", warmup_ratio=0.0, prompt=PromptSpec(virtual_tokens=4))


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its decoder's matrices redrawn larger (std 0.1). The random tiny model
    answers every prompt with newlines (its tied embeddings echo the prompt's last token); this one
    answers each prompt differently, so answers that agree mean something."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("tiny-varied")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer_of(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def train_rows(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Example]:
    spec = tiny_lora_spec(tmp_path_factory.mktemp("methods-data"), base_dir, "methods", per_label=4)
    return prepare(load_spec(spec)).train


def _questions() -> list[Example]:
    return [Example("q", ({"role": "user", "content": q}, {"role": "assistant", "content": "-"}), "-")
            for q in QUESTIONS]


def _base(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def _answers(model, tokenizer) -> list[str]:
    """Greedy answers through evaluation's generation, all rows in one batch."""
    return generate_detailed(model, tokenizer, _questions(), GenerateOptions(
        batch_size=len(QUESTIONS), autocast=contextlib.nullcontext(), decoding=Decoding(max_new_tokens=NEW_TOKENS),
        show_progress=False)).texts


@dataclass
class Trained:
    model: torch.nn.Module
    out: Path  # the run folder: adapter/ and checkpoints/
    loss: float
    answers: list[str]
    tokens: int  # the run's train_tokens


@pytest.fixture(scope="module")
def trained(base_dir: Path, tokenizer_of, train_rows, tmp_path_factory: pytest.TempPathFactory):
    """Each method trained once (uninterrupted), on first use."""
    done: dict[str, Trained] = {}

    def get(method: str) -> Trained:
        if method not in done:
            out = tmp_path_factory.mktemp(f"run-{method}")
            model, result = train(_cfg(method), _base(base_dir), tokenizer_of, train_rows, out,
                                  TrainOptions(fingerprint="fp", show_progress=False))
            assert result.steps == 3 and result.final_loss == result.final_loss  # not NaN
            done[method] = Trained(model.eval(), out, result.final_loss, _answers(model, tokenizer_of), result.train_tokens)
        return done[method]

    return get


@pytest.fixture(scope="module")
def base_answers(base_dir: Path, tokenizer_of) -> list[str]:
    return _answers(_base(base_dir), tokenizer_of)


@pytest.mark.parametrize("method", METHODS)
def test_a_resumed_run_ends_as_an_uninterrupted_one(method: str, trained, base_dir: Path, tokenizer_of, train_rows,
                                                     tmp_path: Path):
    whole = trained(method)
    # a run stopped after its step-2 checkpoint: what a crash at step 3 leaves behind
    shutil.copytree(whole.out / "checkpoints" / "step-0000002", tmp_path / "checkpoints" / "step-0000002")
    model, result = train(_cfg(method), _base(base_dir), tokenizer_of, train_rows, tmp_path,
                          TrainOptions(fingerprint="fp", resume=True, show_progress=False))
    assert (result.resumed_from_step, result.steps) == (2, 3)
    assert result.final_loss == whole.loss
    assert result.train_tokens == whole.tokens  # the whole run's, the 2 steps before the crash included
    a = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{method}: {name} differs after resume")


def _reload(method: str, folder: Path, base_dir: Path):
    """The saved folder loaded again: a whole model for ``full``, else the base with the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method == "full":
        assert not (folder / "adapter_config.json").exists() and (folder / "config.json").is_file()
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return PeftModel.from_pretrained(_base(base_dir), folder).eval()


@pytest.mark.parametrize("method", METHODS)
def test_the_saved_folder_answers_as_the_model_in_memory(method: str, trained, base_dir: Path, tokenizer_of,
                                                         base_answers: list[str]):
    run = trained(method)
    assert len(set(run.answers)) > 1, run.answers  # the rows answer differently: agreeing is not trivial
    assert run.answers != base_answers, "training did not change the answers"
    assert _answers(_reload(method, run.out / "adapter", base_dir), tokenizer_of) == run.answers


def _greedy_by_forward_passes(model, tokenizer, prompt: list[int], end: set[int]) -> str:
    """The reference: one unpadded row, the peft model's own forward (virtual tokens included) over
    the whole sequence at every step, the most likely next token appended."""
    ids = list(prompt)
    answer: list[int] = []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in end:
                break
            answer.append(token)
            ids.append(token)
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", ["prefix", pytest.param("prompt", marks=pytest.mark.slow)])
def test_virtual_tokens_generate_as_greedy_forward_passes(method: str, trained, tokenizer_of, base_answers: list[str]):
    run = trained(method)
    tok = tokenizer_of
    end = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    reference = [_greedy_by_forward_passes(run.model, tok, encode_prompt(tok, ex), end) for ex in _questions()]
    assert run.answers == reference  # batched, padded rows of different lengths, through VirtualTokens
    assert reference != base_answers  # the virtual tokens change the answers: dropping them would show


KINDS = {"lora": "lora", "rslora": "lora", "dora": "merged", "ia3": "merged", "prefix": "virtual",
         "prompt": "virtual", "full": "full"}


@pytest.mark.parametrize("methods", [FAST, pytest.param(TRAIN_METHODS, marks=pytest.mark.slow)],
                         ids=["one-per-path", "all"])
def test_the_engine_serves_every_method_as_evaluation_answers(methods: tuple[str, ...], trained, base_dir: Path,
                                                              tokenizer_of, base_answers: list[str]):
    """The methods' versions loaded in one engine, every request submitted at once: LoRA and rsLoRA
    batched with the base on the shared model, every other method in batches of its own model, and
    each answer the one evaluation's generation gives the trained model in memory."""
    from tuneline.serve import Engine, Job

    runs = {m: trained(m) for m in methods}
    engine = Engine(_base(base_dir), tokenizer_of, max_batch=64, window_s=0.2)
    try:
        slots = {m: engine.adapter_for(f"m-{m}@1", str(run.out / "adapter")) for m, run in runs.items()}
        assert {m: engine.per_model[s].kind if s in engine.per_model else "lora" for m, s in slots.items()} == {
            m: KINDS[m] for m in methods}
        batched = [slots[m] for m in methods if KINDS[m] == "lora"]
        assert engine.multi is not None and engine.multi.names == batched
        prompts = [encode_prompt(tokenizer_of, ex) for ex in _questions()]
        wanted = {**{slots[m]: run.answers for m, run in runs.items()}, "__base__": base_answers}
        jobs = [(slot, k, Job(p, slot, NEW_TOKENS)) for slot in wanted for k, p in enumerate(prompts)]
        for _, _, job in jobs:
            job.model_slot = job.adapter if job.adapter in engine.per_model else ""
        with engine._queue.mutex:  # enqueued at once: the worker forms its batches from all of them
            engine._queue.queue.extend(job for _, _, job in jobs)
            engine._queue.unfinished_tasks += len(jobs)
            engine._queue.not_empty.notify()
        for slot, k, job in jobs:
            assert job.future.result(timeout=120).text.strip() == wanted[slot][k], (slot, k)
        # one batch per model: the shared base (lora, rslora, base rows) and each per-model version
        own = len(methods) - len(batched)
        assert sorted(engine.batch_sizes) == sorted([(len(batched) + 1) * len(prompts)] + [len(prompts)] * own)
    finally:
        engine.close()


def test_lora_on_the_last_layers_adapts_only_them_and_backpropagates_through_no_other(
        base_dir: Path, tokenizer_of, train_rows, tmp_path: Path):
    """``train.lora.layers: 1`` on the 2-layer model: the adapter holds every linear of layer 1 and
    nothing of layer 0, and training never records a graph through layer 0 (its output needs no
    gradient), which is where the saving comes from. Asking for more layers than the model has is
    refused, naming the field."""
    from safetensors.torch import load_file

    from tuneline.errors import TrainingError

    cfg = _cfg("lora").model_copy(update={"lora": LoraSpec(layers=1)})
    base = _base(base_dir)
    needs_grad: dict[int, set[bool]] = {0: set(), 1: set()}
    for i, layer in enumerate(base.model.layers):
        layer.register_forward_hook(
            lambda _m, _args, out, i=i: needs_grad[i].add((out[0] if isinstance(out, tuple) else out).requires_grad))
    model, result = train(cfg, base, tokenizer_of, train_rows, tmp_path / "run",
                          TrainOptions(fingerprint="fp", show_progress=False))
    assert result.steps == 3 and result.final_loss == result.final_loss
    assert needs_grad == {0: {False}, 1: {True}}
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert {k.split(".layers.")[1].split(".")[0] for k in saved} == {"1"}
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in saved} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # training moved them

    too_many = _cfg("lora").model_copy(update={"lora": LoraSpec(layers=3)})
    with pytest.raises(TrainingError, match="has 2 decoder layers") as info:
        train(too_many, _base(base_dir), tokenizer_of, train_rows, tmp_path / "run3",
              TrainOptions(fingerprint="fp", show_progress=False))
    assert info.value.problems[0].field == "train.lora.layers"
