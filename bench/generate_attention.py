"""Generation with the eager attention (what CPU training uses) against PyTorch SDPA, side by side.

Runs the built-in SmolLM2-135M (bf16) through ``tuneline.eval.generate.generate_detailed`` with
constrained label decoding on BANKING77 test rows, for three prompt lengths: the plain prompt,
the hybrid's prompt (4 retrieved examples) and the prompt-only baseline's (the 77 labels listed in
the system prompt). Each attention runs twice, alternating; the best time of each is compared, and
the answers of both are compared row by row.

    .venv/bin/python bench/generate_attention.py --rows 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    import importlib

    gen = importlib.import_module("tuneline.eval.generate")  # the module (tuneline.eval.generate is also a function)
    from tuneline.context import open_context
    from tuneline.models import load_model
    from tuneline.pipeline import hybrid_retriever
    from tuneline.retrieval import with_label_set
    from tuneline.runtime import autocast_for

    ctx = open_context(ROOT / "examples/banking77/hybrid.yaml")
    tok, data = ctx.tokenizer, ctx.data
    model = load_model(ctx.source, ctx.workspace.models_dir, device="cpu", dtype="bf16")
    rows = data.test[: args.rows]
    retriever = hybrid_retriever(ctx)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    cases = {"plain": rows, "hybrid (k=4)": retriever.augment(rows),
             "label list": [with_label_set(ex, data.labels or []) for ex in rows]}
    for name, prompts in cases.items():
        trie = gen.LabelTrie(tok, data.labels or [], prompts[0], eos)
        length = sum(len(gen.encode_prompt(tok, p)) for p in prompts) / len(prompts)
        best: dict[str, float] = {}
        answers: dict[str, list[str]] = {}
        for attention in ("eager", "sdpa", "eager", "sdpa"):
            # generate_detailed switches an eager model to SDPA; "eager" pins it by hiding the switch
            real = gen.inference_attention
            if attention == "eager":
                gen.inference_attention = _unchanged  # type: ignore[assignment]
            try:
                t0 = time.perf_counter()
                out = gen.generate_detailed(model, tok, prompts, gen.GenerateOptions(
                    batch_size=args.batch_size, max_new_tokens=trie.max_len, autocast=autocast_for("bf16", "cpu"),
                    show_progress=False, labels=trie))
                seconds = time.perf_counter() - t0
            finally:
                gen.inference_attention = real
            best[attention] = min(best.get(attention, float("inf")), seconds)
            answers[attention] = out.texts
        same = sum(a == b for a, b in zip(answers["eager"], answers["sdpa"], strict=True))
        right = {a: sum(x == ex.reference for x, ex in zip(answers[a], rows, strict=True)) for a in answers}
        print(f"{name:14s} {length:5.0f} prompt tokens: eager {best['eager']:6.1f}s  sdpa {best['sdpa']:6.1f}s  "
              f"same answers {same}/{len(prompts)} (right: eager {right['eager']}, sdpa {right['sdpa']})  "
              f"speed-up {best['eager'] / best['sdpa']:.2f}x", flush=True)


def _unchanged(model: object):  # noqa: ANN202 - a context manager that leaves the model as it is
    from contextlib import nullcontext

    return nullcontext()


if __name__ == "__main__":
    main()
