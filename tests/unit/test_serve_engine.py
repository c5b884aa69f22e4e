"""The serving engine: requests for different adapters batched together answer exactly as alone."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def engine(tiny_model_dir: Path, tmp_path: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.serve import Engine

    paths = []
    for seed in (1, 2):  # two adapters with random (non-zero) B: each changes the answers
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(tmp_path / f"a{seed}")
        paths.append(str(tmp_path / f"a{seed}"))
    eng = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                 AutoTokenizer.from_pretrained(tiny_model_dir), max_batch=16, window_s=0.05)
    names = [eng.adapter_for(f"m@{i}", p) for i, p in enumerate(paths)]
    yield eng, names
    eng.close()


def test_mixed_adapter_batch_equals_one_at_a_time(engine):
    from tuneline.serve import Job

    eng, names = engine
    tok = eng.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in ("my card has not arrived", "what is the exchange rate today?", "lost card")]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = [(p, a) for p in prompts for a in [*names, "__base__"]]
    alone = [eng.submit(Job(p, a, 6)).result().text for p, a in rows]
    # the reference: peft's own forward (its adapter_names path), one row at a time
    import torch

    for (p, a), text in zip(rows, alone, strict=True):
        with torch.inference_mode():
            out = eng.model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                     adapter_names=[a], pad_token_id=tok.pad_token_id)
        new = out[0, len(p):].tolist()
        end = next((k for k, t in enumerate(new) if t in eng.end_ids), len(new))
        assert tok.decode(new[:end], skip_special_tokens=True) == text, (a, text)
    per = len(names) + 1
    assert all(len(set(alone[i:i + per])) == per for i in range(0, len(alone), per))  # each adapter differs

    jobs = [Job(p, a, 6) for p, a in rows]
    with eng._queue.mutex:  # enqueue all at once: the worker takes them as one batch
        eng._queue.queue.extend(jobs)
        eng._queue.unfinished_tasks += len(jobs)
        eng._queue.not_empty.notify()
    assert [j.future.result().text for j in jobs] == alone
    assert eng.batch_sizes[-1] == len(jobs)  # answered in one generate call


def test_the_end_of_turn_token_ends_an_answer_as_in_evaluation(tiny_model_dir: Path):
    """A tokenizer whose eos is <|endoftext|>: the chat template's <|im_end|> still ends the answer
    (evaluation stops there too), rather than generating on to max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.serve import Engine, Job

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():  # a model that always says <|im_end|> first
        head.weight.zero_()
        head.bias.zero_()
        head.bias[end_of_turn] = 10.0
    model.lm_head = head
    eng = Engine(model, tok)
    try:
        prompt = tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        result = eng.submit(Job(prompt, "__base__", 8)).result(timeout=60)
    finally:
        eng.close()
    assert (result.finish_reason, result.completion_tokens, result.text) == ("stop", 0, "")
