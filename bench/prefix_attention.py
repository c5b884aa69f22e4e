"""Label scoring over prompts with a long shared prefix: the prefix's KV cache copied for every row,
against the prefix kept once (``tuneline.models.prefix_attention``).

The baseline stage's prompts share long prefixes: ``prompt`` lists the 77 labels (about 575 shared
tokens), ``few_shot`` shows 8 fixed demonstrations, and the evaluation's own prompts share only the
system prompt and instruction (23 tokens). Each is scored on the same BANKING77 test rows with the
built-in SmolLM2-135M, as the baseline stage scores them (``generate_detailed`` with the label trie,
batches of 128), both ways, in alternating rounds (each keeps its best time), and their answers are
compared row by row.

    .venv/bin/python bench/prefix_attention.py [--rows 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="test rows (a seeded sample, as baseline.max_rows)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    from classify_eval import demo_model

    gen = importlib.import_module("tuneline.eval.generate")  # the module: tuneline.eval.generate is also a function
    from tuneline.models import prefix_attention
    from tuneline.retrieval.index import with_demonstrations, with_label_set
    from tuneline.runtime import autocast_for

    tok, data, precision, model = demo_model()
    labels = data.labels or []
    rows = random.Random(0).sample(data.test, min(args.rows, len(data.test)))
    shots = random.Random(0).sample(data.train, 8)
    sets = {"prompt (the 77 labels)": [with_label_set(ex, labels) for ex in rows],
            "few_shot (8 examples)": [with_demonstrations(ex, shots) for ex in rows],
            "evaluation prompt": rows}
    trie = gen.LabelTrie(tok, labels, rows[0], tok.convert_tokens_to_ids(tok.eos_token))
    supports = prefix_attention.supports
    print(f"{len(rows)} rows, {precision}, batches of {args.batch_size}, best of {args.rounds} rounds")
    for name, prompts in sets.items():
        encoded = [gen.encode_prompt(tok, ex) for ex in prompts]
        shared = gen.common_prefix_len(encoded)
        own = sum(len(p) - shared for p in encoded) / len(encoded)
        seconds: dict[bool, float] = {}
        answers: dict[bool, list[str]] = {}
        for _ in range(args.rounds):
            for once in (False, True):
                prefix_attention.supports = supports if once else (lambda _model: False)  # type: ignore[assignment]
                options = gen.GenerateOptions(batch_size=args.batch_size, max_new_tokens=trie.max_len, labels=trie,
                                              autocast=autocast_for(precision, "cpu"), show_progress=False)
                t0 = time.perf_counter()
                answers[once] = gen.generate_detailed(model, tok, prompts, options).texts
                seconds[once] = min(seconds.get(once, float("inf")), time.perf_counter() - t0)
        prefix_attention.supports = supports  # type: ignore[assignment]
        same = sum(a == b for a, b in zip(answers[False], answers[True], strict=True))
        print(f"{name}: shared prefix {shared} tokens, {own:.1f} own tokens a row")
        print(f"  prefix copied for every row: {seconds[False]:6.1f} s")
        print(f"  prefix kept once:            {seconds[True]:6.1f} s: {seconds[False] / seconds[True]:.2f}x; "
              f"same answer on {same}/{len(rows)} rows")


if __name__ == "__main__":
    main()
