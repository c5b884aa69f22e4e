"""Curation throughput and quality on a synthetic corpus with planted duplicates and PII.

Generates N rows (default 200,000) of customer-support messages (15-45 words, 20 intents) into a
JSONL file, with planted:

  exact duplicates   a copy of an earlier row, re-cased and re-spaced (5%)
  near duplicates    a copy of an earlier row of >= 30 words with one word replaced (5%)
  PII                an email, phone number, payment card, IBAN, IPv4 or national id (5% of rows)
  distractors        dates, times, amounts, order numbers, versions in ~20% of rows (must survive)

then runs tuneline's default curation (as `tuneline data prepare` does, the too-long check
included) and prints rows/s for the whole pipeline and per step, and the recall and precision of
the planted duplicates and PII. The last line is the overall rows/s.

    python bench/curation_throughput.py [--rows 200000] [--seed 0] [--no-tokenizer]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

INTENTS = ["card_arrival", "card_lost", "exchange_rate", "top_up_failed", "transfer_pending", "refund",
           "pin_blocked", "account_closed", "fee_charged", "cash_withdrawal", "verify_identity", "change_address",
           "direct_debit", "apple_pay", "virtual_card", "salary_received", "cheque_deposit", "atm_swallowed",
           "beneficiary", "disputed_payment"]
OPENERS = ["hi", "hello", "hey there", "good morning", "excuse me", "dear support", "quick question", "help"]
SUBJECTS = ["my card", "the transfer", "my top up", "the payment", "my account", "the refund", "my pin",
            "the app", "my salary", "the cash machine", "the exchange", "my new card", "the direct debit"]
VERBS = ["has not arrived", "was declined", "is still pending", "failed again", "was charged twice",
         "shows the wrong amount", "is blocked", "did not go through", "was reversed", "disappeared"]
FILLER = str.split("i really need this sorted today because i am travelling soon and cannot wait any longer for an answer "
          "from your team please let me know what to do next and whether i should contact my bank or the shop "
          "it is very frustrating to keep checking the app every hour without any update at all so thanks a lot "
          "for looking into it as soon as possible my friend had the same problem last month as well "
          "maybe something changed on your side recently since everything worked fine before the last update")
WORDS = sorted(set(FILLER) | {"yesterday", "morning", "evening", "weekend", "abroad", "online", "store", "euro",
                              "pounds", "dollars", "branch", "website", "message", "email", "notification"})


def distractor(rng: random.Random) -> str:
    return rng.choice([
        f"on {rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/2024",
        f"on 2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        f"at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        f"for {rng.randint(1, 2000)}.{rng.randint(0, 99):02d} euros",
        f"order {rng.randint(10000, 9999999)}",
        f"app version {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
        f"about {rng.randint(2, 99)}% of it",
    ])


def luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randint(0, 9) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit goes after these
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[i : i + 4] for i in range(0, 16, 4))


def iban(rng: random.Random) -> str:
    bban = f"WEST{rng.randint(10**13, 10**14 - 1)}"
    numeric = "".join(str(int(c, 36)) for c in bban + "GB00")
    check = 98 - int(numeric) % 97
    return f"GB{check:02d}{bban}"


def pii(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["email", "phone", "card", "iban", "ip", "national_id"])
    value = {
        "email": lambda: f"{rng.choice(['jane', 'tom', 'a.b', 'li_wei'])}{rng.randint(1, 999)}@example{rng.randint(1, 9)}.com",
        "phone": lambda: f"+44 20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
        "card": lambda: luhn_card(rng),
        "iban": lambda: iban(rng),
        "ip": lambda: f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "national_id": lambda: f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
    }[kind]()
    return kind, value


def make_corpus(n: int, seed: int, path: Path) -> dict:
    """Write the corpus; return the planted truth: duplicate pairs, near pairs, PII rows."""
    rng = random.Random(seed)
    rows: list[dict] = []
    truth: dict = {"exact": {}, "near": {}, "pii": {}, "distractors": 0}
    originals: list[int] = []
    for i in range(n):
        r = rng.random()
        if i > 100 and r < 0.05:  # exact duplicate, re-cased and re-spaced
            j = rng.randrange(i)
            src = rows[j]
            rows.append({"text": "  " + src["text"].upper().replace(" ", "  ") + " ", "label": src["label"]})
            truth["exact"][i] = j
            continue
        if i > 100 and r < 0.10:
            j = rng.choice(originals)  # of an original row: no chains of near-duplicates
            words = rows[j]["text"].split()
            if len(words) >= 30 and j not in truth["pii"]:
                k = rng.randrange(len(words))
                words[k] = rng.choice([w for w in WORDS if w != words[k]])
                rows.append({"text": " ".join(words), "label": rows[j]["label"]})
                truth["near"][i] = j
                continue
        label = rng.randrange(len(INTENTS))
        words = [rng.choice(OPENERS), rng.choice(SUBJECTS), rng.choice(VERBS)]
        words += rng.sample(WORDS, rng.randint(12, 40))
        text = " ".join(words)
        if rng.random() < 0.2:
            text += " " + distractor(rng)
            truth["distractors"] += 1
        if rng.random() < 0.05:
            kind, value = pii(rng)
            text += f" my details {value} thanks"
            truth["pii"][i] = (kind, value)
        originals.append(i)
        rows.append({"text": text, "label": INTENTS[label]})
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true", help="skip the too-long check (needs no model)")
    args = ap.parse_args()

    from tuneline.curation import curate
    from tuneline.spec import load_spec

    tmp = Path(tempfile.mkdtemp(prefix="curation-bench-"))
    t0 = time.perf_counter()
    truth = make_corpus(args.rows, args.seed, tmp / "train.jsonl")
    print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.1f}s: {len(truth['exact']):,} exact and "
          f"{len(truth['near']):,} near duplicates, {len(truth['pii']):,} rows with PII, "
          f"{truth['distractors']:,} with dates/amounts/order numbers")
    spec = tmp / "tuneline.yaml"
    spec.write_text(f"name: bench\ntask: {{type: classification, labels: {json.dumps(INTENTS)}}}\n"
                    "objective: {primary: accuracy}\nmodel: smollm2-135m\n"
                    "data: {train: {path: train.jsonl}}\ntrain: {seq_len: 256}\n")
    loaded = load_spec(spec)
    tokenizer = None
    if not args.no_tokenizer:
        from tuneline.models import load_tokenizer, resolve_model_source

        tokenizer = load_tokenizer(resolve_model_source("smollm2-135m"), REPO / ".tuneline" / "models")
    t0 = time.perf_counter()
    curated = curate(loaded, tokenizer)
    seconds = time.perf_counter() - t0

    print(f"{'step':14s} {'rows in':>9s} {'rows out':>9s} {'seconds':>8s} {'rows/s':>10s}")
    for s in curated.steps:
        rate = s.rows_in / s.seconds if s.seconds > 0 else float("inf")
        print(f"{s.name:14s} {s.rows_in:9,d} {s.rows_out:9,d} {s.seconds:8.2f} {rate:10,.0f}")

    line = {int(r.where.rsplit(":", 1)[1]) - 1: r for r in curated.rejects}  # 0-based row -> reject
    kinds = {i: r.reason.split(":")[0] for i, r in line.items()}
    for name, planted, kind in (("exact duplicates", truth["exact"], "exact_duplicate"),
                                ("near duplicates", truth["near"], "near_duplicate")):
        found = {i for i, k in kinds.items() if k == kind}
        hit = len(found & set(planted))
        print(f"{name}: recall {hit / max(1, len(planted)):.4f} ({hit:,} of {len(planted):,} planted), "
              f"precision {hit / max(1, len(found)):.4f} ({len(found):,} dropped as {kind})")
    # PII: every planted value gone from the curated text (or its row dropped for another reason)
    kept = {int(ex.where.rsplit(":", 1)[1]) - 1: ex.messages[-2]["content"] for split in curated.splits.values()
            for ex in split}
    missed = [i for i, (_, value) in truth["pii"].items() if i in kept and value in kept[i]]
    judged = [i for i in truth["pii"] if i in kept]
    print(f"PII: recall {1 - len(missed) / max(1, len(judged)):.4f} ({len(judged) - len(missed):,} of "
          f"{len(judged):,} planted values redacted; {len(missed)} missed"
          + (f", e.g. {truth['pii'][missed[0]]}" if missed else "") + ")")
    placeholder = re.compile(r"<(EMAIL|PHONE|CARD|IBAN|IP|NATIONAL_ID)>")
    false = [i for i, text in kept.items() if i not in truth["pii"] and placeholder.search(text)]
    flagged = sum(1 for text in kept.values() if placeholder.search(text))
    print(f"PII: precision {1 - len(false) / max(1, flagged):.4f} ({len(false)} rows redacted without planted PII"
          + (f", e.g. {kept[false[0]]!r}" if false else "") + f"); counts {curated.pii_counts}")
    print(f"default curation: {args.rows:,} rows in {seconds:.2f}s = {args.rows / seconds:,.0f} rows/s")


if __name__ == "__main__":
    main()
