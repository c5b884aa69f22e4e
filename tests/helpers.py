"""Helpers for tests: write small data files and specs."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from click.testing import Result

REPO = Path(__file__).resolve().parents[1]
BANKING = REPO / "examples" / "banking77" / "data"


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@functools.cache
def _banking_split(split: str) -> tuple[dict[str, str], ...]:
    """A BANKING77 split's rows, read once per test process (the suite asks for them ~260 times)."""
    with (BANKING / f"{split}.csv").open() as f:
        return tuple(csv.DictReader(f))


def banking_rows(labels: list[str], per_label: int, split: str = "train") -> list[dict[str, str]]:
    """The first ``per_label`` BANKING77 rows of each of ``labels`` (real data shipped in examples/),
    each a fresh dict the caller may change."""
    out: list[dict[str, str]] = []
    counts = dict.fromkeys(labels, 0)
    for row in _banking_split(split):
        lab = row["category"]
        if lab in counts and counts[lab] < per_label:
            counts[lab] += 1
            out.append(dict(row))
    return out


def write_spec(dir_: Path, body: str) -> Path:
    p = dir_ / "tuneline.yaml"
    p.write_text(textwrap.dedent(body).lstrip())
    return p


def lora_model(model_dir: Path, attn: str | None = None, dtype=None, **lora):
    """A LoRA-wrapped model with random (non-zero) B matrices, so the adapters change the output.

    peft starts B at zero; tests comparing two computations need adapters that matter."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneline.spec.models import LoraSpec, TrainSpec
    from tuneline.train.peft_builders import wrap_for_training

    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn} if attn else {}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, **kwargs)
    model = float64_adapters(wrap_for_training(base, TrainSpec(lora=LoraSpec(**lora))))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def float64_adapters(model):
    """``model`` with its trainable weights back in float64 if its base is float64.

    ``wrap_for_training`` keeps trainable weights in fp32 (right for a bf16 base); in a float64
    model, kept for comparing two orderings of the same math, that would be the one fp32 rounding
    left, and the fused LoRA path (computing in the base weight's dtype) would not share it."""
    import torch

    if any(p.dtype == torch.float64 for p in model.parameters() if not p.requires_grad):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.double()
    return model


def tiny_lora_spec(dir_: Path, model_dir: Path, name: str, per_label: int = 8, max_steps: int = 3,
                   train: str | None = None, extra: str = "") -> Path:
    """A classification spec training a LoRA adapter on the tiny model in a few steps, with the
    slow evaluation extras (probe, robustness, latency) off: for registry and serving tests."""
    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    write_csv(dir_ / "train.csv", banking_rows(labels, per_label))
    write_csv(dir_ / "test.csv", banking_rows(labels, 2, "test"))
    default_train = (f"{{method: lora, lr: 3.0e-2, max_steps: {max_steps}, batch_size: 8, seq_len: 96, "
                     "precision: fp32, seed: 0}")
    spec = write_spec(dir_, f"""
        name: {name}
        task: {{type: classification, instruction: Classify the message.}}
        objective: {{primary: accuracy, thresholds: ["accuracy >= 0.0"]}}
        model: {model_dir}
        data:
          train: {{path: train.csv, columns: {{label: category}}}}
          test: {{path: test.csv, columns: {{label: category}}}}
        train: {train or default_train}
        eval: {{batch_size: 16, forgetting: false, robustness: {{enabled: false}}, latency: {{enabled: false}}}}
    """)
    return _append(spec, extra) if extra else spec


def _append(spec: Path, extra: str) -> Path:
    """``spec`` with the top-level YAML ``extra`` added at its end."""
    spec.write_text(spec.read_text() + textwrap.dedent(extra).strip() + "\n")
    return spec


def spec_error(dir_: Path, extra: str) -> str:
    """The SpecError message of a minimal classification spec plus ``extra`` (top-level YAML)."""
    import pytest

    from tuneline.errors import SpecError
    from tuneline.spec import load_spec

    body = "name: x\ntask: {type: classification}\nobjective: {primary: accuracy}\nmodel: smollm2-135m\n"
    body += "data: {train: {path: train.csv}}\n" + textwrap.dedent(extra).strip() + "\n"
    (dir_ / "tuneline.yaml").write_text(body)
    with pytest.raises(SpecError) as info:
        load_spec(dir_ / "tuneline.yaml")
    return str(info.value)



# The unit roundoff u of each floating-point type: the largest relative error of one rounding
# (half the gap between 1 and the next representable number).
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def unit_roundoff(dtype) -> float:
    """u of ``dtype``, a torch dtype or its name."""
    return UNIT_ROUNDOFF[str(dtype).removeprefix("torch.")]


def tolerance(dtype, reduction_len: int, scale: float = 1.0, c: float = 4.0) -> dict[str, float]:
    """``atol``/``rtol`` for ``torch.testing.assert_close`` between two computations of the same
    math that differ only in rounding: summation order, chunking, masking, or the matmul kernel the
    CPU picks (AMX on Intel, AVX-512 or AVX2 on AMD block and accumulate their sums differently).

    A sum of n terms rounded in ``dtype`` is off by up to n*u*S, and by about sqrt(n)*u*S in
    practice (the roundings are independent), where u is the unit roundoff of ``dtype`` and S the
    sum of the *magnitudes* of the terms, not the result: an element that cancels to near 0 still
    carries the error of its large terms, so a per-element relative tolerance is the wrong shape.
    The bound is absolute, ``atol = c*sqrt(n)*u*scale`` (``rtol`` 0), where ``scale`` is the
    magnitude the errors are relative to (``ref.abs().max()`` for a tensor of gradients, the value
    itself for a sum of positive terms) and ``n`` the longest reduction on the path (the
    vocabulary for the output head's backward pass, the hidden size for a forward, the number of
    tokens for a sum of per-token losses); ``c`` covers the few layers an error passes through.
    In float64 this is ~1e-13 relative: only a different summation order stays inside it.
    """
    return {"rtol": 0.0, "atol": c * reduction_len**0.5 * unit_roundoff(dtype) * float(scale)}


def float64_model_tolerance(model, scale: float, c: float = 4.0) -> dict[str, float]:
    """Tolerance between two computations of the same math in a float64 transformer ``model``:
    float64's over the vocabulary (the longest reduction, in the head's backward pass), plus one
    fp32 rounding that float64 does not remove: transformers computes RoPE's cos/sin in fp32 and
    casts them, and the same position can come out an ulp apart in two layouts (vectorised body
    or scalar tail); each attention score, a sum over the head dimension of products carrying it,
    moves by at most about that relative to its terms, and so does what it flows into."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"rtol": 0.0, "atol": tolerance("float64", cfg.vocab_size, scale, c)["atol"]
            + tolerance("float32", head_dim, scale, c)["atol"]}


def loss_tolerance(loss: float, n_tokens: int, vocab_size: int, logits_dtype=None, max_logit: float = 0.0,
                   mean: bool = False, c: float = 4.0) -> dict[str, float]:
    """Tolerance for a cross-entropy summed over ``n_tokens`` answer tokens, computed two ways.

    ``tuneline.train.loss`` computes it in fp32 whatever the model's dtype. Each token's
    log-sum-exp over the vocabulary is the log of an fp32 sum of ``vocab_size`` terms, off by up to
    c*sqrt(V)*u32 in absolute terms; if the logits come from a ``logits_dtype`` coarser than fp32
    (bf16), each logit also carries about c*u*|logit| and a token's loss moves by at most twice the
    largest logit error. Tokens err independently (sqrt of their number), and the fp32 sum of the
    per-token losses adds its own ``tolerance(float32, n_tokens, scale=loss)``. With ``mean``,
    ``loss`` is that sum divided by ``n_tokens`` (the training loss), and so is the tolerance.
    """
    per_token = tolerance("float32", vocab_size, c=c)["atol"]
    if logits_dtype is not None:
        per_token += c * unit_roundoff(logits_dtype) * 2 * max_logit
    loss = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    divisor = n_tokens if mean else 1
    summed = tolerance("float32", n_tokens, scale=abs(loss) * divisor, c=c)["atol"]
    return {"rtol": 0.0, "atol": (n_tokens**0.5 * per_token + summed) / divisor}


def assert_packed_examples_stay_apart(model, examples, pad_id: int, capacity: int, device: str = "cpu") -> None:
    """Per example: keep only its labels in the packed batch; its loss must equal running it alone,
    within :func:`loss_tolerance` for the model's dtype (bf16 adds its rounding of the logits).

    Another example sharing its row (before it) would change it if attention leaked: the same packed
    row with one causal mask over the whole row (positions running on) must fall outside the tolerance,
    checked for at least two examples."""
    import torch

    from tuneline.data.tokenize import IGNORE_INDEX, Encoded
    from tuneline.train.batching import collate, collate_packed
    from tuneline.train.loss import answer_loss_sum

    def on(batch: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    dtype, vocab = next(model.parameters()).dtype, model.config.vocab_size
    leaks_checked = 0
    with torch.no_grad():
        for i, e in enumerate(examples):
            only = [e if j == i else Encoded(o.input_ids, [IGNORE_INDEX] * len(o.input_ids), o.where)
                    for j, o in enumerate(examples)]
            batch = on(collate_packed(only, pad_id, capacity))
            assert batch["input_ids"].shape[0] < len(examples)  # it really shares a row with others
            packed, n = answer_loss_sum(model, batch)
            alone_batch = on(collate([e], pad_id))
            alone, n_alone = answer_loss_sum(model, alone_batch)
            assert n == n_alone == e.n_answer_tokens
            max_logit = float(model(input_ids=alone_batch["input_ids"]).logits.abs().max())
            tol = loss_tolerance(alone, n, vocab, dtype, max_logit)
            torch.testing.assert_close(packed, alone, **tol, msg=lambda m, w=e.where: f"{w}: {m}")
            row, at = (int(v) for v in (batch["labels"] != IGNORE_INDEX).nonzero()[0])
            if at > int(batch["position_ids"][row, at]):  # an example precedes it in its row
                rows, width = batch["input_ids"].shape
                leaky = {**batch, "position_ids": torch.arange(width, device=device).expand(rows, -1)}
                assert not torch.allclose(answer_loss_sum(model, leaky)[0], alone, **tol), e.where
                leaks_checked += 1
    assert leaks_checked >= 2


@contextlib.contextmanager
def uvicorn_on_loopback(app) -> Iterator[str]:
    """Serve ``app`` under uvicorn on a free 127.0.0.1 port, in a thread; yields its base URL and
    stops the server on exit."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.025)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def tiny_engine(model_dir: Path, max_batch: int) -> Iterator:
    """A serving :class:`tuneline.serve.Engine` on the tiny fp32 model, closed on exit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.serve import Engine

    eng = Engine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                 AutoTokenizer.from_pretrained(model_dir), max_batch=max_batch, window_s=0.01, resolve_ttl=0.0)
    try:
        yield eng
    finally:
        eng.close()


def invoke_cli(*args: str) -> Result:
    """``tuneline ARGS`` in this process (Typer's runner, 250 columns). The root logger's handlers
    and level are put back afterwards: the command points them at the runner's stream, which is
    closed once it returns, while other threads (a server's) may go on logging."""
    import logging

    from typer.testing import CliRunner

    from tuneline.cli import app

    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def search_spec(tmp_path: Path, model_dir: Path, *, trials: int = 6, extra: str = "", name: str = "tiny-search") -> Path:
    """A spec whose search tunes lr and the LoRA rank on the tiny model, pruning with successive halving."""
    return tiny_lora_spec(
        tmp_path, model_dir, name, per_label=12,
        train="{method: lora, lr: 1.0e-2, lora: {r: 8}, epochs: 3, batch_size: 8, seq_len: 96, precision: fp32, seed: 0}",
        extra=f"""
        curation: {{split: {{validation: 0.25}}}}
        baseline: {{enabled: false}}
        search:
          trials: {trials}
          metric: eval_loss
          space:
            lr: {{type: loguniform, low: 1.0e-5, high: 5.0e-2}}
            lora.r: {{type: categorical, choices: [4, 8]}}
          pruner: {{type: successive_halving, min_resource: 1, reduction_factor: 2}}
          eval_every: 0.5
          seed: 0
        {extra}
        """)
