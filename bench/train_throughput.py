"""Training throughput: tuneline's trainer vs the standard Hugging Face path, side by side.

Both train the built-in SmolLM2-135M with LoRA (r=16, all linear layers) on the same BANKING77
examples for the same number of optimizer steps (batch 16 by default):

  (a) standard: transformers ``Trainer`` + peft, ``DataCollatorForSeq2Seq`` padding, default
      (fp32) precision, labels masked to the answer exactly as tuneline masks them;
  (b) tuned: TRL's ``SFTTrainer`` configured as a careful user would on this CPU: bf16 where the
      CPU multiplies it natively (the rule tuneline's ``auto`` follows), length-grouped batches
      (``train_sampling_strategy: group_by_length``: little padding), completion-only loss on the
      same answer tokens, no activation checkpointing (TRL turns it on by default), SDPA attention,
      the same LoRA. Not padding-free nor packed: without FlashAttention (no CPU build) the rows of
      a flattened batch attend to each other here (measured: a second row's logits off by 20.8 with
      SDPA and position ids on this CPU), which TRL's documentation also says;
  (c) tuneline: ``tuneline.train.train`` with its defaults (bf16 base + fp32 adapters where
      supported, fused LoRA, answer-only logits, the shared prefix once per batch, packed into
      one of the rows with each example's own tokens, random batches; ``--unpacked``: padded length-grouped
      batches instead),
      and the Trainer's linear schedule without warm-up so the loss curves are comparable.

Each runs in its own process so peak RSS is its own. Prints real (non-padding) tokens/s, peak RSS,
the loss curves, the held-out loss of each, tuneline's utilisation of this machine's matmul peak
in the precision tuneline computes in (bf16 where native, else fp32; measured in the same run),
and last the speed-up ratios against (a) and (b).

    python bench/train_throughput.py [--steps 20] [--batch 16] [--unpacked]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "examples" / "banking77" / "tuneline.yaml"


HELD_OUT = 200  # rows after the training rows, never trained on: both models' loss is measured on them


def _examples(n: int):
    from tuneline.curation import prepare
    from tuneline.spec import load_spec

    return prepare(load_spec(SPEC)).train[:n]


def _held_out_loss(model, tok, n_train: int, precision: str) -> float:
    """Mean answer-token loss on the same held-out rows, computed by the same code for both runs."""
    from tuneline.train.loop import encode_all, evaluate_loss

    encoded, _ = encode_all(tok, _examples(n_train + HELD_OUT)[n_train:], 256)
    return evaluate_loss(model, encoded, 32, tok.pad_token_id, precision, "cpu")


def _model_dir(cache: Path) -> Path:
    from tuneline.models import ensure_converted, resolve_model_source

    return ensure_converted(resolve_model_source("smollm2-135m"), cache)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_standard(steps: int, batch: int, cache: Path, out: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from tuneline.train.loop import encode_all

    d = _model_dir(cache)
    tok = AutoTokenizer.from_pretrained(d)
    encoded, _ = encode_all(tok, _examples(steps * batch), 256)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in encoded]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32),
                           LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out.update(seconds=seconds, tokens=sum(len(r["input_ids"]) for r in rows), losses=losses,
               peak_rss_gb=_peak_rss_gb(), held_out_loss=_held_out_loss(model, tok, steps * batch, "fp32"))


def run_sft(steps: int, batch: int, cache: Path, out: dict) -> None:
    """TRL's SFTTrainer as a careful user would configure it here (see the module docstring)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tuneline.runtime import cpu_has_fast_bf16
    from tuneline.train.loop import encode_all

    d = _model_dir(cache)
    tok = AutoTokenizer.from_pretrained(d)
    encoded, _ = encode_all(tok, _examples(steps * batch), 256)
    # tokenized as tuneline tokenizes (the same rows and answer tokens), the answer as the completion
    rows = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": [int(x != -100) for x in e.labels]}
                              for e in encoded])
    bf16 = cpu_has_fast_bf16()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation="sdpa")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=1e-3, lr_scheduler_type="linear", logging_steps=1, report_to="none",
                     save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, bf16=bf16,
                     train_sampling_strategy="group_by_length", completion_only_loss=True, max_length=256,
                     gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out.update(seconds=seconds, tokens=sum(len(e.input_ids) for e in encoded), losses=losses,
               peak_rss_gb=_peak_rss_gb(), precision="bf16" if bf16 else "fp32",
               held_out_loss=_held_out_loss(trainer.model, tok, steps * batch, "bf16" if bf16 else "fp32"))


def run_tuneline(steps: int, batch: int, cache: Path, packing: bool | None, out: dict) -> None:
    from tuneline.models import load_model, load_tokenizer, resolve_model_source
    from tuneline.runtime import resolve_precision
    from tuneline.spec.models import TrainSpec
    from tuneline.train import TrainOptions, train

    source = resolve_model_source("smollm2-135m")
    precision = resolve_precision("auto", "cpu")
    tok = load_tokenizer(source, cache)
    model = load_model(source, cache, dtype=precision)
    from tuneline.train.loop import encode_all

    # the Trainer's defaults where they differ from tuneline's: linear decay, no warm-up
    cfg = TrainSpec(max_steps=steps, batch_size=batch, lr=1e-3, seq_len=256, warmup_ratio=0.0, lr_scheduler="linear",
                    packing=packing)
    examples = _examples(steps * batch)
    encoded, _ = encode_all(tok, examples, 256)
    config = model.config
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    losses: list[float] = []
    trained, result = train(cfg, model, tok, examples, Path(tempfile.mkdtemp()), TrainOptions(show_progress=False,
                            on_step=lambda step, m: losses.append(m["train_loss"])))
    out.update(seconds=result.seconds, tokens=result.train_tokens, computed_tokens=result.computed_tokens, losses=losses,
               peak_rss_gb=_peak_rss_gb(), precision=precision, non_embedding_params=non_embedding,
               held_out_loss=_held_out_loss(trained, tok, steps * batch, precision),
               adapter_params=result.trainable_params, head_params=config.vocab_size * config.hidden_size,
               answer_tokens=sum(e.n_answer_tokens for e in encoded),
               attention_flops=sum(len(e.input_ids) ** 2 for e in encoded) * 6 * config.hidden_size
               * config.num_hidden_layers)


# (M, K, N): a large square product and the built-in model's own projections at a large token count
PEAK_SHAPES = [(2048, 2048, 2048), (4096, 576, 576), (4096, 576, 1536), (4096, 1536, 576)]


def peak_precision() -> str:
    """The precision tuneline computes in here (``auto``): bf16 where the CPU multiplies it natively,
    else fp32 (where bf16 products are emulated, many times slower: not a peak to measure against)."""
    from tuneline.runtime import resolve_precision

    return resolve_precision("auto", "cpu")


def matmul_flops() -> dict[tuple[int, int, int], float]:
    """Matmul FLOP/s in :func:`peak_precision` for each of PEAK_SHAPES, best of 5 timings each (the
    machine is noisy)."""
    import torch

    dtype = torch.bfloat16 if peak_precision() == "bf16" else torch.float32
    out = {}
    for m, k, n in PEAK_SHAPES:
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        a @ b
        reps = max(3, int(2e10 / (2 * m * k * n)))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = min(best, time.perf_counter() - t0)
        out[(m, k, n)] = 2 * m * k * n * reps / best
    return out


def _in_child(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        p = ctx.Process(target=fn, args=(*args, out))
        p.start()
        p.join()
        if p.exitcode != 0:
            sys.exit(f"{fn.__name__} failed with exit code {p.exitcode}")
        return dict(out)


def _tail(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


def _curve(losses: list[float]) -> str:
    """First loss, final loss, and the mean of the last quarter (single steps are noisy)."""
    return f"loss {losses[0]:.3f} -> final {losses[-1]:.3f} (last-quarter mean {_tail(losses):.3f})"


def _curves(std: list[float], sft: list[float], ours: list[float]) -> str:
    """The loss curves side by side, every few steps."""
    every = max(1, len(std) // 8)
    steps = sorted({*range(0, len(std), every), len(std) - 1})
    return "\n".join(f"  step {s + 1:4d}  standard {std[s]:.3f}  SFTTrainer {sft[s]:.3f}  tuneline {ours[s]:.3f}"
                     for s in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps for each trainer")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cache", type=Path, default=REPO / ".tuneline" / "models")
    ap.add_argument("--unpacked", action="store_true",
                    help="train tuneline with train.packing: false (padded, length-grouped batches)")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    _model_dir(args.cache)  # convert once, outside the timings

    peaks_before = matmul_flops()
    std = _in_child(run_standard, args.steps, args.batch, args.cache)
    sft = _in_child(run_sft, args.steps, args.batch, args.cache)
    ours = _in_child(run_tuneline, args.steps, args.batch, args.cache, False if args.unpacked else None)
    peaks_after = matmul_flops()
    peaks = {shape: max(peaks_before[shape], peaks_after[shape]) for shape in PEAK_SHAPES}
    square, best_shape = peaks[PEAK_SHAPES[0]], max(PEAK_SHAPES, key=lambda sh: peaks[sh])
    std_tps, sft_tps, our_tps = (r["tokens"] / r["seconds"] for r in (std, sft, ours))
    # Work actually done. Frozen base: forward 2N + backward to the inputs 2N per computed token
    # (a shared prefix counts once per batch, not once per example); adapters: forward 2P + backward
    # 4P (inputs and weights); vocabulary head (frozen, tied) only at answer positions; causal
    # attention 2 L^2 d per layer forward, x3 with the backward (~1% of the total here).
    done = ours["computed_tokens"]

    def work(tokens: int) -> float:
        return (4 * ours["non_embedding_params"] * tokens + 6 * ours["adapter_params"] * tokens
                + 4 * ours["head_params"] * ours["answer_tokens"] + ours["attention_flops"])

    flops = work(done)
    achieved = flops / ours["seconds"]
    # model FLOPs utilisation (MFU, as usually defined): the same formula over every real token of
    # every example, whatever the implementation skipped (here: the prefix computed once per batch)
    model_flops = work(ours["tokens"]) / ours["seconds"]
    print(f"examples: {args.steps * args.batch} BANKING77 rows, {args.steps} steps of {args.batch}")
    print(f"{peak_precision()} matmul FLOP/s measured now (best of before and after the runs): "
          + ", ".join(f"{m}x{k}x{n} {peaks[(m, k, n)] / 1e9:.0f} G" for m, k, n in PEAK_SHAPES))
    print(f"standard (Trainer + peft, fp32, padding): {std_tps:7.1f} real tokens/s  peak RSS {std['peak_rss_gb']:.2f} GB  "
          f"{_curve(std['losses'])}")
    print(f"SFTTrainer ({sft['precision']}, length-grouped, completion-only): {sft_tps:7.1f} real tokens/s  peak RSS "
          f"{sft['peak_rss_gb']:.2f} GB  {_curve(sft['losses'])}")
    print(f"tuneline ({ours['precision']}, answer-only logits):      {our_tps:7.1f} real tokens/s  peak RSS "
          f"{ours['peak_rss_gb']:.2f} GB  {_curve(ours['losses'])}")
    print("loss curves (same rows, same steps):")
    print(_curves(std["losses"], sft["losses"], ours["losses"]))
    print(f"held-out answer loss after training ({HELD_OUT} unseen rows, same code): "
          f"standard {std['held_out_loss']:.3f}, SFTTrainer {sft['held_out_loss']:.3f}, "
          f"tuneline {ours['held_out_loss']:.3f}")
    print(f"tuneline utilisation: {achieved / 1e9:.0f} GFLOP/s = {100 * achieved / square:.1f}% of the square "
          f"2048^3 {peak_precision()} product, {100 * achieved / peaks[best_shape]:.1f}% of the best shape "
          f"({flops / done / 1e6:.0f} MFLOP per computed token, {done:,} computed of {ours['tokens']:,} "
          f"example tokens: 4 x {ours['non_embedding_params'] / 1e6:.1f}M "
          f"frozen + 6 x {ours['adapter_params'] / 1e6:.2f}M adapter params, head at answer tokens, attention)")
    print(f"tuneline model FLOPs utilisation (the same formula over all {ours['tokens']:,} example tokens, as if "
          f"each prefix were computed per example): {model_flops / 1e9:.0f} GFLOP/s = "
          f"{100 * model_flops / square:.1f}% of the square product, {100 * model_flops / peaks[best_shape]:.1f}% "
          f"of the best shape")
    print(f"speed-up (real tokens/s): tuneline / SFTTrainer tuned {our_tps / sft_tps:.2f}x; "
          f"tuneline / Trainer defaults {our_tps / std_tps:.2f}x")


if __name__ == "__main__":
    main()
