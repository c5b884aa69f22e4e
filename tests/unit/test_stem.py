"""The frozen stem cache: with ``lora.layers`` the frozen lower layers' states are computed once per
example, and a batch starting from them gives the loss and gradients of the whole forward pass.

The equalities run the tiny model in float64, so only the summation order differs (the batch shapes
of the one pass that computes the states and of the training batches are not the same), within
:func:`helpers.float64_model_tolerance` for gradients and :func:`helpers.loss_tolerance` for losses."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from helpers import float64_model_tolerance, lora_model, loss_tolerance

from tuneline.data.tokenize import Encoded
from tuneline.train.batching import StemRows
from tuneline.train.loop import make_batch
from tuneline.train.loss import answer_loss_sum
from tuneline.train.stem import build_stem, stem_depth


def _examples(n: int = 9, seed: int = 0) -> list[Encoded]:
    """Examples that share an 8-token prompt prefix, then their own tokens and a 1-5 token answer."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(10, 1000, (8,), generator=g).tolist()
    out = []
    for i in range(n):
        own = torch.randint(10, 1000, (5 + (7 * i) % 11,), generator=g).tolist()
        answer = torch.randint(10, 1000, (1 + i % 5,), generator=g).tolist()
        ids = prefix + own + answer
        out.append(Encoded(ids, [-100] * (len(ids) - len(answer)) + answer, f"row {i}"))
    return out


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss, n = answer_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


LAYOUTS = {"padded": (None, False, False), "padded after a shared prefix": (None, True, False),
           "packed": (40, False, False), "packed after a shared prefix": (40, True, False),
           "packed with the prefix folded in": (40, True, True)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_batch_from_the_cached_stem_has_the_loss_and_gradients_of_the_whole_model(tiny_model_dir, layout):
    model = lora_model(tiny_model_dir, dtype=torch.float64, layers=1)  # layer 0 frozen, layer 1 adapted
    assert stem_depth(model) == 1
    examples = _examples()
    stem = build_stem(model, examples, 1, pad_id=2, precision="fp32", device="cpu")
    capacity, share, fold = LAYOUTS[layout]
    batch_ids = [6, 1, 4, 8, 0]  # not the order nor the grouping the states were computed in
    micro = [examples[i] for i in batch_ids]
    plain = make_batch(micro, 2, "cpu", capacity, share)
    cached = make_batch(micro, 2, "cpu", capacity, share, StemRows([stem.states(i) for i in batch_ids], 1), fold)
    assert bool(plain.get("prefix_len")) == share and ("folded" in cached) == fold

    want_loss, want_n, want = _loss_and_grads(model, plain)
    got_loss, got_n, got = _loss_and_grads(model, cached)

    assert got_n == want_n == sum(e.n_answer_tokens for e in micro)
    torch.testing.assert_close(got_loss, want_loss, **loss_tolerance(want_loss, want_n, model.config.vocab_size))
    assert want.keys() == got.keys() and all("layers.1." in k for k in want)
    for k in want:
        tol = float64_model_tolerance(model, float(want[k].abs().max()))
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_the_cached_states_are_those_the_frozen_layers_compute(tiny_model_dir):
    """Each example's cached states equal the first layer's output for that example alone: a wrong
    position, mask or prefix in the one batched pass would show here (and starting a batch from zeros,
    as a broken layout would, changes the loss: the equality above is not vacuous)."""
    model = lora_model(tiny_model_dir, dtype=torch.float64, layers=1)
    examples = _examples()
    stem = build_stem(model, examples, 1, pad_id=2, precision="fp32", device="cpu")
    decoder = model.get_base_model().model
    for i, e in enumerate(examples):
        with torch.no_grad():
            alone = decoder(input_ids=torch.tensor([e.input_ids]), output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(stem.states(i), alone, **float64_model_tolerance(model, float(alone.abs().max())))

    batch = make_batch(examples[:4], 2, "cpu", 40, True, StemRows([stem.states(i) for i in range(4)], 1))
    zeroed = {**batch, "stem_states": torch.zeros_like(batch["stem_states"])}
    with torch.no_grad():
        assert abs(float(answer_loss_sum(model, zeroed)[0]) - float(answer_loss_sum(model, batch)[0])) > 1e-3


def test_a_decoder_whose_own_forward_differs_gets_no_cache(tiny_model_dir, caplog):
    """A model that scales its embeddings inside its forward (as Gemma does) passes the layout check,
    but the states the cache would compute differ from the model's own: the build says so and gives
    none, and training computes every layer."""
    model = lora_model(tiny_model_dir, layers=1)
    examples = _examples()
    assert build_stem(model, examples, 1, pad_id=2, precision="fp32", device="cpu") is not None
    decoder = model.get_base_model().model
    own_forward = decoder.forward
    decoder.forward = lambda input_ids=None, **kw: own_forward(inputs_embeds=decoder.embed_tokens(input_ids) * 8.0, **kw)
    with caplog.at_level(logging.WARNING, logger="tuneline.train.stem"):
        assert build_stem(model, examples, 1, pad_id=2, precision="fp32", device="cpu") is None
    assert "differ from the model's own forward pass" in caplog.text


def test_only_frozen_leading_layers_make_a_stem(tiny_model_dir):
    assert stem_depth(lora_model(tiny_model_dir, layers=1)) == 1
    assert stem_depth(lora_model(tiny_model_dir)) == 0  # every layer adapted: nothing to cache


def _rows(n: int = 24):
    from tuneline.data.examples import Example

    return [Example(f"row {i}", ({"role": "system", "content": "Classify the message."},
                                 {"role": "user", "content": f"message number {i} about {'cards' if i % 2 else 'loans'}"},
                                 {"role": "assistant", "content": "card" if i % 2 else "loan"}), "card" if i % 2 else "loan")
            for i in range(n)]


def _train(tiny_model_dir, tokenizer, out, rows, epochs: float, cache: bool, **options) -> tuple[list[float], int]:
    """Train LoRA on the tiny model's last layer; return (the loss of every step, calls of the frozen layer)."""
    from transformers import AutoModelForCausalLM

    from tuneline.spec.models import TrainSpec
    from tuneline.train import TrainOptions, train

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    calls = [0]
    base.model.layers[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    losses: list[float] = []
    cfg = TrainSpec(lora={"layers": 1}, epochs=epochs, batch_size=8, lr=1e-2, seed=0, cache_frozen_layers=cache,
                    precision="fp32")  # bf16 hosts too: only the summation order may differ
    train(cfg, base, tokenizer, rows, out, TrainOptions(
        show_progress=False, on_step=lambda _s, m: losses.append(m["train_loss"]), **options))
    return losses, calls[0]


def test_training_with_the_cache_runs_the_frozen_layer_once_per_example_batch_and_learns_the_same(
        tiny_model_dir, tokenizer, tmp_path, caplog):
    """Two epochs over 24 examples: with the cache the frozen layer runs only in the one pass before
    the first step (one call per batch of states, one per shared prefix, one checking an example
    against the model's own forward), not in every step; the
    losses of every step match training without it."""
    rows = _rows()
    with caplog.at_level(logging.INFO, logger="tuneline.train.stem"):
        cached, cached_calls = _train(tiny_model_dir, tokenizer, tmp_path / "a", rows, 2, cache=True)
    assert "computed the 1 frozen decoder layers once for 24 examples" in caplog.text
    plain, plain_calls = _train(tiny_model_dir, tokenizer, tmp_path / "b", rows, 2, cache=False)
    assert len(cached) == len(plain) == 6
    assert plain_calls >= 2 * 6  # the prefix and the rows, in every step
    assert cached_calls <= 3  # 24 examples: one batch of states, its prefix once, the one-example check
    # fp32 summation order only (u = 6e-8), carried through six Adam steps: measured 9e-8 relative
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=1e-5)


def test_trainings_sharing_a_memo_compute_the_frozen_layers_once(tiny_model_dir, tokenizer, tmp_path, caplog):
    """A search's trials: one epoch each (alone, not worth caching), the same encoded rows and a
    shared memo; the second trial runs the frozen layer not once and learns what it would alone."""
    import pickle

    from tuneline.train.loop import encode_all
    from tuneline.train.stem import StemMemo

    rows = _rows()
    encoded = encode_all(tokenizer, rows, 256)
    memo = StemMemo()
    alone, alone_calls = _train(tiny_model_dir, tokenizer, tmp_path / "a", rows, 1, cache=True, encoded_train=encoded)
    assert alone_calls >= 2 * 3  # one epoch without a memo: no cache, the frozen layer in every step
    _, first_calls = _train(tiny_model_dir, tokenizer, tmp_path / "b", rows, 1, cache=True, encoded_train=encoded,
                            stem_memo=memo)
    assert 0 < first_calls <= 3 and memo.nbytes > 0
    with caplog.at_level(logging.INFO, logger="tuneline.train.stem"):
        second, second_calls = _train(tiny_model_dir, tokenizer, tmp_path / "c", rows, 1, cache=True,
                                      encoded_train=encoded, stem_memo=memo)
    assert second_calls == 0 and "reusing the 1 frozen decoder layers' states" in caplog.text
    torch.testing.assert_close(torch.tensor(second), torch.tensor(alone), rtol=1e-4, atol=1e-5)
    assert pickle.loads(pickle.dumps(memo)).nbytes == 0  # sent to another process: starts empty


def test_a_later_run_reads_the_stored_states_and_learns_the_same(tiny_model_dir, tokenizer, tmp_path, caplog):
    """Two epochs, the states stored in a folder: a second training on the same rows and base model
    reads them instead of computing them (the frozen layer runs once, for the check against the
    model's own forward) and every step's loss is the first training's."""
    from tuneline.train.stem import StemStore

    rows, store = _rows(), StemStore(tmp_path / "stems")
    first, first_calls = _train(tiny_model_dir, tokenizer, tmp_path / "a", rows, 2, cache=True, stem_store=store)
    assert len(list(store.folder.glob("stem-*.safetensors"))) == 1 and 0 < first_calls <= 3
    with caplog.at_level(logging.INFO, logger="tuneline.train.stem"):
        again, again_calls = _train(tiny_model_dir, tokenizer, tmp_path / "b", rows, 2, cache=True, stem_store=store)
    assert "read the 1 frozen decoder layers' states of 24 examples" in caplog.text
    assert again_calls == 1  # the check of one example; no batch of states computed
    assert again == first  # the same states, byte for byte: the same steps


def test_the_stored_states_are_found_only_for_the_same_rows_and_frozen_weights(tiny_model_dir, tokenizer):
    """The key covers what the states are computed from: another row, another weight in the stem or
    another precision is another key; a weight above the stem (trained, never cached) is not."""
    from tuneline.train.loop import encode_all
    from tuneline.train.stem import stem_key

    model = lora_model(tiny_model_dir, layers=1)
    encoded = encode_all(tokenizer, _rows(), 256)[0]
    key = stem_key(model, encoded, 1, 0, "fp32")
    assert stem_key(model, encoded, 1, 0, "fp32") == key
    assert stem_key(model, encoded[:-1], 1, 0, "fp32") != key
    assert stem_key(model, encoded, 1, 0, "bf16") != key
    decoder = model.base_model.model.model
    with torch.no_grad():
        decoder.layers[1].mlp.down_proj.base_layer.weight[0, 0] += 1.0  # above the stem
        assert stem_key(model, encoded, 1, 0, "fp32") == key
        decoder.layers[0].mlp.down_proj.weight[0, 0] += 1.0  # in the stem
        assert stem_key(model, encoded, 1, 0, "fp32") != key


def test_stored_states_that_no_longer_match_are_computed_again(tiny_model_dir, tokenizer, tmp_path, caplog):
    """A stored file whose states are wrong (here: zeroed) fails the check against the model's own
    forward; the training computes them again and learns what it would without the store."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tuneline.train.stem import StemStore

    rows, store = _rows(), StemStore(tmp_path / "stems")
    first, _ = _train(tiny_model_dir, tokenizer, tmp_path / "a", rows, 2, cache=True, stem_store=store)
    (path,) = store.folder.glob("stem-*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(path)).items()}, str(path), metadata=meta)
    with caplog.at_level(logging.INFO, logger="tuneline.train.stem"):
        again, calls = _train(tiny_model_dir, tokenizer, tmp_path / "b", rows, 2, cache=True, stem_store=store)
    assert "the stored frozen-layer states differ from the model's own forward pass" in caplog.text
    assert "computed the 1 frozen decoder layers once for 24 examples" in caplog.text and calls > 1
    torch.testing.assert_close(torch.tensor(again), torch.tensor(first), rtol=1e-4, atol=1e-5)


def test_the_store_keeps_the_newest_stems(tmp_path):
    from tuneline.train.stem import Stem, StemStore

    store = StemStore(tmp_path)
    stem = Stem(1, [torch.zeros(0, 4)], [0, 0], [torch.ones(2, 4), torch.ones(3, 4)])
    for age, key in ((30, "a"), (20, "b"), (0, "c")):  # written in this order, a the oldest
        store.save(key, stem)
        then = time.time() - age
        os.utime(store.path(key), (then, then))
    assert sorted(p.name for p in tmp_path.glob("stem-*")) == ["stem-b.safetensors", "stem-c.safetensors"]
    loaded = store.load("c")
    assert loaded is not None and loaded.batch_of == [0, 0] and [t.shape for t in loaded.own] == [(2, 4), (3, 4)]
    assert store.load("a") is None
    store.path("c").write_bytes(b"not a safetensors file")  # damaged: not read, computed again by the caller
    assert store.load("c") is None
