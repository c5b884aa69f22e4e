"""What keeping the frozen layers' states on disk saves a later run on the same rows and base model.

The demo's training (``lora.layers: 10`` on the built-in SmolLM2-135M, the demo's 3,000 BANKING77
rows) first computes the 20 frozen layers' states of every example before its first step. A later
run on the same rows and base model (another learning rate, rank or number of epochs) finds them in
the workspace's ``stems`` folder instead. This measures, on one machine in one process:

  compute   :func:`tuneline.train.stem.build_stem` computing the states (and writing them)
  read      the same call finding them stored: the key (a hash of the stem's weights and the rows'
            tokens), reading the file, and the check of one example against the model's own forward

and that the states read are the states computed, byte for byte.

    python bench/stem_store.py [--rows 3000] [--layers 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from train_throughput import SPEC  # the demo's spec, one definition for the benches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000, help="training rows (the demo's sample: 3,000)")
    ap.add_argument("--layers", type=int, default=10, help="layers with adapters (lora.layers); the rest are the stem")
    args = ap.parse_args()

    import torch

    from tuneline.curation import prepare
    from tuneline.models import load_model, load_tokenizer, resolve_model_source
    from tuneline.runtime import resolve_precision
    from tuneline.spec import load_spec
    from tuneline.spec.models import TrainSpec
    from tuneline.train.loop import encode_all
    from tuneline.train.peft_builders import wrap_for_training
    from tuneline.train.stem import StemStore, build_stem, stem_depth
    from tuneline.workspace import Workspace

    loaded = load_spec(SPEC)
    spec = loaded.spec
    source = resolve_model_source(spec.model)
    models = Workspace.at().models_dir
    precision = resolve_precision("auto", "cpu")
    tok = load_tokenizer(source, models)
    cfg = TrainSpec(lora={"r": 16, "alpha": 32, "layers": args.layers}, seq_len=spec.train.seq_len)
    model = wrap_for_training(load_model(source, models, dtype=precision), cfg)
    depth = stem_depth(model)
    encoded = encode_all(tok, prepare(loaded).train[: args.rows], cfg.seq_len)[0]
    store = StemStore(tempfile.mkdtemp(prefix="stems-"))
    print(f"{len(encoded)} examples, {depth} frozen layers, precision {precision}, store {store.folder}")

    t0 = time.perf_counter()
    built = build_stem(model, encoded, depth, tok.pad_token_id, precision, "cpu", store=store)
    compute = time.perf_counter() - t0
    t0 = time.perf_counter()
    read = build_stem(model, encoded, depth, tok.pad_token_id, precision, "cpu", store=store)
    reading = time.perf_counter() - t0
    assert built is not None and read is not None
    same = all(torch.equal(a, b) for a, b in zip(built.own, read.own, strict=True)) and all(
        torch.equal(a, b) for a, b in zip(built.prefixes, read.prefixes, strict=True))
    size = sum(p.stat().st_size for p in store.folder.iterdir()) / 2**20
    print(f"compute (and write): {compute:.1f} s; read: {reading:.1f} s; {compute / reading:.1f}x; "
          f"file {size:.0f} MB; states read equal the states computed: {same}")


if __name__ == "__main__":
    main()
