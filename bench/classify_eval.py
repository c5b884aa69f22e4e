"""A constrained classification evaluation on the demo's test rows: decoding against label scoring.

Runs the built-in SmolLM2-135M (the precision `auto` picks here) over BANKING77 test rows as the
demo's evaluation does (``generate_detailed`` with the label trie, batches of 128, the shared
prompt prefix computed once per batch): with ``generate``'s constrained decoding, and with
``label_scoring.score_labels`` (the default), compares their answers row by row and prints the
speed-up. Then, on the same rows and batches, it times only the forward pass over each row's own
prompt tokens (after the shared prefix, padded as decoding pads them): the part of the work
every scorer of these prompts must do, whatever it does after the last prompt token.

    .venv/bin/python bench/classify_eval.py --rows 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def demo_model() -> tuple[Any, Any, str, Any]:
    """The demo's tokenizer and prepared data, the precision ``auto`` picks on this CPU, and the
    built-in model loaded in it."""
    from tuneline.context import open_context
    from tuneline.models import load_model
    from tuneline.runtime import resolve_precision

    ctx = open_context(ROOT / "examples/banking77/tuneline.yaml")
    precision = resolve_precision("auto", "cpu")
    return ctx.tokenizer, ctx.data, precision, load_model(ctx.source, ctx.workspace.models_dir, device="cpu",
                                                          dtype=precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    import torch

    from tuneline.eval.generate import (
        GenerateOptions,
        LabelTrie,
        common_prefix_len,
        encode_prompt,
        generate_cache_argument,
        generate_detailed,
        pad_after_prefix,
        prefix_cache,
    )
    from tuneline.models.loading import inference_attention
    from tuneline.runtime import autocast_for
    from tuneline.train.peft_builders import causal_lm_of

    tok, data, precision, model = demo_model()
    rows = data.test[: args.rows]
    trie = LabelTrie(tok, data.labels or [], rows[0], tok.convert_tokens_to_ids(tok.eos_token))
    seconds, answers = {}, {}
    for scoring in (False, True, False, True):  # alternating: each keeps its best time
        options = GenerateOptions(batch_size=args.batch_size, max_new_tokens=trie.max_len, label_scoring=scoring,
                                  autocast=autocast_for(precision, "cpu"), show_progress=False, labels=trie)
        t0 = time.perf_counter()
        answers[scoring] = generate_detailed(model, tok, rows, options).texts
        seconds[scoring] = min(seconds.get(scoring, float("inf")), time.perf_counter() - t0)
    decode, scored = seconds[False], seconds[True]
    same = sum(a == b for a, b in zip(answers[False], answers[True], strict=True))

    prompts = [encode_prompt(tok, ex) for ex in rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    n_prefix = common_prefix_len(prompts)
    decoder = getattr(causal_lm_of(model), causal_lm_of(model).base_model_prefix)
    padded = real = 0
    t0 = time.perf_counter()
    with torch.inference_mode(), inference_attention(model), autocast_for(precision, "cpu"):
        for b in range(0, len(order), args.batch_size):
            batch = [prompts[i] for i in order[b : b + args.batch_size]]
            ids, mask = pad_after_prefix(batch, batch[0][:n_prefix], tok.pad_token_id)  # decoding's layout
            padded, real = padded + ids[:, n_prefix:].numel(), real + int(mask[:, n_prefix:].sum())
            cache = prefix_cache(model, ids[:1, :n_prefix], len(batch))
            decoder(input_ids=ids[:, n_prefix:], attention_mask=mask, **{generate_cache_argument(model): cache})
    forward = time.perf_counter() - t0
    print(f"{len(rows)} rows, {precision}, batches of {args.batch_size}; shared prefix {n_prefix} tokens")
    print(f"  constrained decoding (generate):           {decode:6.1f} s")
    print(f"  label scoring (score_labels):              {scored:6.1f} s: {decode / scored:.2f}x faster; "
          f"same answer on {same}/{len(rows)} rows")
    print(f"  forward over the rows' own prompt tokens:  {forward:6.1f} s = {forward / decode:.0%} of decoding")
    print(f"  own prompt tokens: {real:,} ({real / len(rows):.1f} a row); computed with padding: {padded:,} "
          f"({padded / real:.2f}x)")


if __name__ == "__main__":
    main()
