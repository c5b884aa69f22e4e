"""An evaluation that reflects production: every system on the same rows, with intervals and gates.

:class:`Evaluation` collects answers system by system (``score_system`` is called with each model
while it is in memory: the base model before training, the candidate after, the production
adapter when there is one), then :meth:`Evaluation.finish` scores them: metrics with 95%
bootstrap intervals on the test split and every golden set, paired differences (McNemar's test
for right/wrong answers, paired bootstrap otherwise), flips, the forgetting probe, robustness
under perturbations, latency, and the spec's gates.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from tuneline.curation.canary import Canary
from tuneline.curation.steps import input_of
from tuneline.data.examples import Example
from tuneline.eval import stats
from tuneline.eval.canary import canary_prompts, canary_report, probe_tokens
from tuneline.eval.classify import classify_detailed, is_classifier
from tuneline.eval.gates import check_gates
from tuneline.eval.generate import (
    Decoding,
    GenerateOptions,
    Generation,
    LabelTrie,
    generate_detailed,
)
from tuneline.eval.metrics import (
    Scored,
    bleu_tokenize_for,
    closest_reference,
    score,
)
from tuneline.eval.perturb import perturb_example
from tuneline.eval.probe import load_probe, probe_correct, probe_examples
from tuneline.eval.results import (
    FLIP_DELTA,
    Comparison,
    Confusion,
    Estimate,
    EvalSuite,
    Flip,
    Forgetting,
    Latency,
    Perturbed,
    ProbeItem,
    Robustness,
    SetResult,
    SystemResult,
)
from tuneline.runtime.progress import progress_bar
from tuneline.spec import COMMON_METRICS, GENERATION_TASKS, LOWER_IS_BETTER, TASK_METRICS, Spec

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """An evaluation set: one :class:`Example` per item (see :func:`tuneline.eval.items.group_items`)."""

    name: str
    kind: str  # test | golden
    examples: list[Example]
    version: int | None = None
    sha256: str | None = None
    path: str | None = None


class Evaluation:
    """Answers of each system on each evaluation set, then one :class:`EvalSuite` from them."""

    def __init__(self, spec: Spec, tokenizer: PreTrainedTokenizerBase, sets: list[EvalSet], labels: list[str] | None,
                 *, autocast: AbstractContextManager[object], device: str = "cpu", show_progress: bool = True) -> None:
        self.spec, self.tokenizer, self.sets, self.labels = spec, tokenizer, sets, labels
        self.autocast, self.device, self.show_progress = autocast, device, show_progress
        self.models: dict[str, str] = {}  # system -> what it is
        self.answers: dict[tuple[str, str], Generation] = {}  # (set, system) -> answers
        self.probe: dict[str, Generation] = {}
        self.perturbed: dict[str, Generation] = {}
        self.robust_rows: list[int] = []
        self.latency: Latency | None = None
        self.trie = self._trie()
        self.canaries: list[Canary] = []  # the memorization probe (eval.canaries): set before scoring
        self.canary_answers: dict[str, list[str]] = {}  # system -> an answer per probe

    # --- collecting answers ---------------------------------------------------------------------

    def score_system(self, name: str, model: nn.Module, description: str,
                     augment: Callable[[list[Example]], list[Example]] | None = None) -> None:
        """Generate ``name``'s answers on every set (and the probes that apply to it) with ``model``.
        ``augment`` turns the plain prompts into what this system is served (the hybrid: retrieved
        examples in front); it is applied to every prompt, the perturbed ones and each timed request."""
        self.models[name] = description
        prompts = augment or (lambda examples: examples)
        for s in self.sets:
            self.answers[(s.name, name)] = self._generate(model, prompts(s.examples), f"{name} on {s.name}")
        # a classifier head answers labels only: the general-ability probe does not apply to it
        if self.spec.eval.forgetting and name in ("base", "candidate") and not is_classifier(model):
            self.probe[name] = self._generate(model, prompts(probe_examples(load_probe())),
                                              f"{name} forgetting probe", constrained=False,
                                              decoding=Decoding(max_new_tokens=24))  # fixed: greedy, 24 tokens
        if name in ("base", "candidate") and any(c.probes for c in self.canaries):
            self.canary_answers[name] = self._generate(
                model, prompts(canary_prompts(self.canaries)), f"{name} canaries", constrained=False,
                decoding=Decoding(max_new_tokens=probe_tokens(self.canaries, self.tokenizer))).texts  # greedy
        if name == "candidate":
            self._robustness(model, prompts)
            if self.spec.eval.latency.enabled:
                self.latency = self._latency(model, prompts)

    def _trie(self) -> LabelTrie | None:
        spec, tok = self.spec, self.tokenizer
        first = next((s.examples[0] for s in self.sets if s.examples), None)
        if spec.task.type != "classification" or not spec.eval.constrain_to_labels or not self.labels or first is None:
            return None
        # one token string converts to one id (the list form is for a list of tokens)
        eos = cast("int | None", tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None)
        return LabelTrie(tok, self.labels, first, eos)

    def _generate(self, model: nn.Module, examples: list[Example], what: str, *, constrained: bool = True,
                  decoding: Decoding | None = None, batch_size: int | None = None,
                  progress: bool = True) -> Generation:
        t0 = time.perf_counter()
        out = self._answers(model, examples, what, constrained, decoding, batch_size, progress)
        if progress:  # where an evaluation's time goes, one line per set and system
            log.info("eval %s: %d rows in %.1fs", what, len(examples), time.perf_counter() - t0)
        return out

    def _answers(self, model: nn.Module, examples: list[Example], what: str, constrained: bool,
                 decoding: Decoding | None, batch_size: int | None, progress: bool) -> Generation:
        trie = self.trie if constrained else None
        if is_classifier(model):  # task.head: classifier: one forward pass per batch, nothing generated
            return classify_detailed(model, self.tokenizer, examples, GenerateOptions(
                batch_size=batch_size or self.spec.eval.batch_size, autocast=self.autocast, device=self.device,
                description=f"eval {what}", show_progress=self.show_progress and progress))
        if decoding is None:  # the spec's settings; a label never needs more tokens than the trie's longest
            decoding = Decoding(max_new_tokens=trie.max_len) if trie else Decoding.of(self.spec.decoding)
        return generate_detailed(model, self.tokenizer, examples, GenerateOptions(
            batch_size=batch_size or self.spec.eval.batch_size,
            decoding=decoding, autocast=self.autocast, device=self.device,
            description=f"eval {what}", show_progress=self.show_progress and progress, labels=trie,
            share_prefix=len(examples) > 1,
        ))

    def _robustness(self, model: nn.Module, prompts: Callable[[list[Example]], list[Example]]) -> None:
        cfg = self.spec.eval.robustness
        main = self.sets[0].examples if self.sets else []
        if not cfg.enabled or not main:
            return
        rows = list(range(len(main)))
        random.Random(cfg.seed).shuffle(rows)
        self.robust_rows = sorted(rows[: cfg.max_rows])
        for kind in cfg.perturbations:
            examples = [perturb_example(main[i], kind, cfg.seed + i) for i in self.robust_rows]
            self.perturbed[kind] = self._generate(model, prompts(examples), f"robustness {kind}")

    def _latency(self, model: nn.Module, prompts: Callable[[list[Example]], list[Example]]) -> Latency | None:
        main = self.sets[0].examples if self.sets else []
        n = min(self.spec.eval.latency.requests, len(main))
        if n == 0:
            return None
        picks = random.Random(1).sample(range(len(main)), n)
        self._generate(model, prompts([main[picks[0]]]), "latency warm-up", batch_size=1, progress=False)
        times, tokens = [], 0
        with progress_bar(enabled=self.show_progress) as bar:  # one bar for all requests, none per request
            task = bar.add_task("eval latency", total=n)
            for i in picks:
                t0 = time.perf_counter()
                out = self._generate(model, prompts([main[i]]), "latency", batch_size=1, progress=False)
                times.append(time.perf_counter() - t0)
                tokens += out.tokens[0] + int(out.stopped[0])
                bar.advance(task)
        ms = np.array(times) * 1000
        return Latency(n=n, p50_ms=float(np.percentile(ms, 50)), p95_ms=float(np.percentile(ms, 95)),
                       mean_ms=float(ms.mean()), tokens_per_second=tokens / max(1e-9, float(np.sum(times))))

    # --- scoring --------------------------------------------------------------------------------

    def _score(self, gen: Generation, examples: list[Example]) -> Scored:
        return score(self.spec.task.type, gen.texts, [ex.all_references for ex in examples], self.labels,
                     primary=self.spec.objective.primary, answer_tokens=gen.tokens, stopped=gen.stopped,
                     bleu_tokenize=bleu_tokenize_for(self.spec))

    def finish(self, created: str | None = None) -> EvalSuite:
        spec = self.spec
        resamples = spec.eval.bootstrap
        set_results = []
        for s in self.sets:
            systems = [name for name in ("base", "candidate", "production") if (s.name, name) in self.answers]
            scored = {name: self._score(self.answers[(s.name, name)], s.examples) for name in systems}
            n = len(s.examples)
            idx = stats.resample_indices(n, resamples) if n else None
            results = []
            for name in systems:
                sc, gen = scored[name], self.answers[(s.name, name)]
                metrics = {}
                for m, agg in sc.metrics.items():
                    iv = stats.bootstrap(agg, n, indices=idx)
                    metrics[m] = Estimate(iv.value, iv.low, iv.high)
                confusion = Confusion(*sc.confusion) if sc.confusion else None
                results.append(SystemResult(
                    name=name, model=self.models.get(name, name), metrics=metrics,
                    seconds_per_example=gen.seconds_per_example, predictions=gen.texts,
                    scores=[float(x) for x in sc.primary_scores], stopped=gen.stopped,
                    per_class=sc.per_class, confusion=confusion))
            comparisons, flips = [], {}
            if "candidate" in scored:
                for other in ("base", "production"):
                    if other in scored:
                        comparisons += _compare(spec, scored["candidate"], scored[other], "candidate", other, n,
                                                resamples)
                        flips[f"candidate_vs_{other}"] = _flips(spec, s, scored["candidate"], scored[other],
                                                                self.answers[(s.name, "candidate")],
                                                                self.answers[(s.name, other)])

            set_results.append(SetResult(
                name=s.name, kind=s.kind, n=n, systems=results, comparisons=comparisons, flips=flips,
                version=s.version, sha256=s.sha256, path=s.path, references=[ex.reference for ex in s.examples],
                wheres=[ex.where for ex in s.examples], inputs=[input_of(ex) for ex in s.examples],
                item_references=[list(ex.all_references) for ex in s.examples]))
        suite = EvalSuite(spec=spec.name, task=spec.task.type, primary=spec.objective.primary,
                          created=created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), sets=set_results,
                          forgetting=self._forgetting(resamples), robustness=self._robustness_result(),
                          latency=self.latency)
        if self.canary_answers:
            suite.canaries = canary_report(self.canaries, self.canary_answers)
        suite.gates = check_gates(spec.objective, suite)
        return suite

    def _forgetting(self, resamples: int) -> Forgetting | None:
        if "base" not in self.probe or "candidate" not in self.probe:
            return None

        questions = load_probe()
        base = np.array([probe_correct(a, q) for a, q in zip(self.probe["base"].texts, questions, strict=True)])
        cand = np.array([probe_correct(a, q) for a, q in zip(self.probe["candidate"].texts, questions, strict=True)])
        n = len(questions)
        b = stats.bootstrap(stats.mean_metric(base), n, resamples=resamples)
        c = stats.bootstrap(stats.mean_metric(cand), n, resamples=resamples)
        items = [ProbeItem(q.question, q.answers[0], ba, ca, bool(bo), bool(co)) for q, ba, ca, bo, co in
                 zip(questions, self.probe["base"].texts, self.probe["candidate"].texts, base, cand, strict=True)]
        return Forgetting(n=n, base=Estimate(b.value, b.low, b.high), candidate=Estimate(c.value, c.low, c.high),
                          drop=b.value - c.value, items=items)

    def _robustness_result(self) -> Robustness | None:
        if not self.perturbed or not self.sets:
            return None
        main = self.sets[0]
        clean_gen = self.answers[(main.name, "candidate")]
        rows = self.robust_rows
        sub = [main.examples[i] for i in rows]
        primary = self.spec.objective.primary
        clean = self._score(Generation([clean_gen.texts[i] for i in rows], 0.0, [clean_gen.stopped[i] for i in rows],
                                       [clean_gen.tokens[i] for i in rows]), sub).values()[primary]
        perturbations = {}
        for kind, gen in self.perturbed.items():
            value = self._score(gen, sub).values()[primary]
            drop = (clean - value) if primary not in LOWER_IS_BETTER else (value - clean)
            perturbations[kind] = Perturbed(value=value, drop=drop)
        return Robustness(set=main.name, metric=primary, n=len(rows), clean=clean, perturbations=perturbations)


def _compare(spec: Spec, a: Scored, b: Scored, a_name: str, b_name: str, n: int, resamples: int) -> list[Comparison]:
    out = []
    for metric in (*TASK_METRICS[spec.task.type], *COMMON_METRICS):
        if metric not in a.metrics or metric not in b.metrics:
            continue
        diff, p = stats.paired_bootstrap(a.metrics[metric], b.metrics[metric], n, resamples=resamples)
        test, a_only, b_only = "paired_bootstrap", None, None
        if metric == "accuracy" and a.correct is not None and b.correct is not None:
            p, a_only, b_only = stats.mcnemar(a.correct, b.correct)
            test = "mcnemar"
        out.append(Comparison(a_name, b_name, metric, Estimate(diff.value, diff.low, diff.high), p, test, p < 0.05,
                              a_only, b_only))
    return out


def _flips(spec: Spec, s: EvalSet, a: Scored, b: Scored, a_gen: Generation, b_gen: Generation) -> list[Flip]:
    """Items right for one system and wrong for the other (``a`` is the later system), each with
    the item's reference closest to ``a``'s answer (ROUGE-L) and its number of references.

    Generation tasks, where an answer is rarely right or wrong as a whole: the items whose primary
    score moved by at least :data:`FLIP_DELTA`, improved or worsened, largest change first."""

    picks: list[tuple[int, str, float | None]]
    if spec.task.type in GENERATION_TASKS:
        delta = np.asarray(a.primary_scores, dtype=float) - np.asarray(b.primary_scores, dtype=float)
        moved = [int(i) for i in np.flatnonzero(np.abs(delta) >= FLIP_DELTA)]
        picks = [(i, "improved" if delta[i] > 0 else "worsened", float(delta[i]))
                 for i in sorted(moved, key=lambda i: (-abs(delta[i]), i))]
    elif a.correct is None or b.correct is None:
        return []
    else:
        picks = [(int(i), "fixed" if a.correct[i] else "broken", None) for i in np.flatnonzero(a.correct != b.correct)]
    out = []
    for i, kind, d in picks:
        ex = s.examples[i]
        refs = ex.all_references
        out.append(Flip(i, ex.where, input_of(ex), ex.reference, b_gen.texts[i], a_gen.texts[i], kind,
                        closest_reference(a_gen.texts[i], refs), len(refs), d))
    return out
