"""Rules across sections of the spec: the primary metric and every gate name a quantity the task
reports, column maps name the task's columns, the search space fits the train section, ...

Each problem names the field it is about, so the loader reports it with its line beside the field
errors. A rule reads only the parts of the spec it needs (:class:`SpecParts`); a part that did not
validate is left out and the rules on it wait until it does (its own field error is reported).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneline.spec.gates import Threshold, gate_name_problem
from tuneline.spec.methods import LORA_SHAPED, PROMPT_LEARNING, QUANTIZED
from tuneline.spec.metrics import TASK_METRICS, validation_metric_problem
from tuneline.spec.tasks import GENERATION_TASKS, TASK_COLUMNS

if TYPE_CHECKING:
    from tuneline.spec.models import CurationSpec, DataSource, SearchSpec, Spec, TrainSpec

Loc = tuple[str | int, ...]
FORMATS = ("jsonl", "csv", "parquet")


def format_loc(loc: Loc) -> str:
    """``("data", "train", "columns")`` -> ``data.train.columns``; list positions as ``[i]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class CrossProblem:
    """A problem across sections, at the field ``loc`` it is about."""

    loc: Loc
    message: str

    def __str__(self) -> str:
        return f"{format_loc(self.loc)}: {self.message}"


@dataclass(frozen=True)
class SpecParts:
    """What the cross-field rules read. ``task`` is the task type; thresholds and data sources come
    with their position in the spec; a part that is None (or left out) did not validate."""

    task: str | None = None
    primary: str | None = None
    thresholds: tuple[tuple[int, Threshold], ...] = ()
    golden_names: tuple[str | None, ...] = ()  # eval.golden[i].name (None: not a name)
    sources: tuple[tuple[Loc, DataSource], ...] = ()  # data.train/eval/test and eval.golden[i]
    curation: CurationSpec | None = None
    train: TrainSpec | None = None
    search: SearchSpec | None = None
    canaries_given: bool = False  # eval.canaries is set (valid or not)
    preferences_given: bool = False  # data.preferences is set
    head: str | None = None  # task.head (None: not given or not valid)
    retrieval_given: bool = False  # the retrieval section is set (valid or not)

    @classmethod
    def of(cls, spec: Spec) -> SpecParts:
        """The parts of a spec whose every field validated."""
        data = spec.data
        sources: list[tuple[Loc, DataSource]] = [
            (("data", split), src) for split, src in (("train", data.train), ("eval", data.eval), ("test", data.test))
            if src is not None]
        sources += [(("eval", "golden", i), g) for i, g in enumerate(spec.eval.golden)]
        return cls(task=spec.task.type, primary=spec.objective.primary,
                   thresholds=tuple(enumerate(spec.objective.parsed_thresholds())),
                   golden_names=tuple(g.name for g in spec.eval.golden), sources=tuple(sources),
                   curation=spec.curation, train=spec.train, search=spec.search,
                   canaries_given=spec.eval.canaries is not None, preferences_given=data.preferences is not None,
                   head=spec.task.head, retrieval_given=spec.retrieval is not None)


def cross_field_problems(parts: SpecParts) -> list[CrossProblem]:
    """Every cross-field problem ``parts`` show, in the order of the spec's sections."""
    return [*_objective_problems(parts), *_golden_problems(parts), *_source_problems(parts),
            *_curation_problems(parts), *_train_problems(parts), *_search_problems(parts),
            *canary_problems(parts), *classifier_head_problems(parts)]


def _train_problems(parts: SpecParts) -> Iterator[CrossProblem]:
    """Settings the chosen training method cannot honour."""
    train = parts.train
    if train is None:
        return
    if train.method in PROMPT_LEARNING and train.packing:
        yield CrossProblem(("train", "packing"),
                           f"packing is not available with method {train.method!r}: its virtual tokens go before "
                           "each example, and a packed row holds several; set packing: false")
    if train.method == "dpo" and not parts.preferences_given:
        yield CrossProblem(("train", "method"), "dpo trains on preference pairs: add data.preferences "
                           "(a file with the task's input columns plus chosen and rejected)")
    if train.method != "dpo" and parts.preferences_given:
        yield CrossProblem(("data", "preferences"), "preference pairs are read only by train.method: dpo: "
                           "set it, or remove data.preferences")
    if train.backend == "ray" and train.method == "dpo":
        yield CrossProblem(("train", "backend"), "dpo's preference phase trains in one process: use backend: local "
                                                 "with method dpo")
    if train.method == "ia3":
        extra = sorted(set(train.ia3.feedforward_modules) - set(train.ia3.target_modules))
        if extra:
            yield CrossProblem(("train", "ia3", "feedforward_modules"),
                               f"{', '.join(extra)} not in train.ia3.target_modules: every feed-forward module "
                               "must also be a target")


def _objective_problems(parts: SpecParts) -> Iterator[CrossProblem]:
    if parts.task is None:
        return
    metrics = TASK_METRICS[parts.task]
    if parts.primary is not None and parts.primary not in metrics:
        yield CrossProblem(("objective", "primary"), f"{parts.primary!r} is not reported for task {parts.task!r}; "
                                                     f"choose one of {list(metrics)}")
    golden = [g for g in parts.golden_names if g is not None]
    for i, threshold in parts.thresholds:
        for _, name in threshold.terms:
            if (why := gate_name_problem(name, parts.task, golden)) is not None:
                yield CrossProblem(("objective", "thresholds", i), f"{str(threshold)!r}: {why}")


def _golden_problems(parts: SpecParts) -> Iterator[CrossProblem]:
    seen: set[str] = set()
    for i, name in enumerate(parts.golden_names):
        if name is not None and name in seen:
            yield CrossProblem(("eval", "golden", i, "name"),
                               f"the golden set name {name!r} is used twice: names must be unique")
        if name is not None:
            seen.add(name)


def _source_problems(parts: SpecParts) -> Iterator[CrossProblem]:
    """Column maps name the task's columns; a file's format is given or read from its suffix."""
    for loc, src in parts.sources:
        if parts.task is not None:
            known = TASK_COLUMNS[parts.task]
            for logical in src.columns:
                if logical not in known:
                    yield CrossProblem((*loc, "columns", logical), f"{logical!r} is not a column of task "
                                                                   f"{parts.task!r}; map one of {list(known)}")
        if src.resolved_format() not in FORMATS:
            yield CrossProblem((*loc, "format"), f"cannot infer the format of {src.path!r}; set format to "
                                                 "jsonl, csv or parquet")


def _curation_problems(parts: SpecParts) -> Iterator[CrossProblem]:
    """Curation settings that only fit some task types."""
    task, curation = parts.task, parts.curation
    if task is None or curation is None or task in GENERATION_TASKS:
        return
    if curation.dedup.conflicts == "references":
        yield CrossProblem(
            ("curation", "dedup", "conflicts"),
            f"'references' (keep different answers to one input) applies only to generation tasks "
            f"({', '.join(GENERATION_TASKS)}); task {task!r} has one correct answer per input, so different "
            "answers to one input are a conflict: use drop, keep_first or warn, or omit the setting (drop)")
    if curation.max_per_input is not None:
        yield CrossProblem(
            ("curation", "max_per_input"),
            f"applies only to generation tasks ({', '.join(GENERATION_TASKS)}), whose inputs may have several "
            f"answers; task {task!r} keeps one answer per input: remove the setting"
            + (" (cap rows per label with curation.max_per_class)" if task == "classification" else ""))


def _search_problems(parts: SpecParts) -> Iterator[CrossProblem]:
    """Validation metrics of early stopping and the search, and the search space against train."""
    task, train, search = parts.task, parts.train, parts.search
    es = train.early_stopping if train is not None else None
    if task is not None and es is not None and es.metric and (why := validation_metric_problem(es.metric, task)):
        yield CrossProblem(("train", "early_stopping", "metric"), why)
    if search is None:
        return
    if task is not None and search.metric and (why := validation_metric_problem(search.metric, task)):
        yield CrossProblem(("search", "metric"), why)
    if train is not None:
        for path, why in search.space_problems(train):
            yield CrossProblem(("search", "space", path), why)
    if (train is not None and train.backend == "ray" and search.backend == "ray" and train.ray.address
            and search.ray.address and train.ray.address != search.ray.address):
        yield CrossProblem(("train", "ray", "address"),
                           f"{train.ray.address!r} is not the search's cluster ({search.ray.address!r}): the search and "
                           "the training of one run share one Ray cluster; leave train.ray.address out to use the "
                           "search's")


# Tasks whose answers are free text a model can learn to reproduce: canaries are planted as answers
CANARY_TASKS: tuple[str, ...] = (*GENERATION_TASKS, "structured")


def canary_problems(parts: SpecParts) -> Iterator[CrossProblem]:
    """A ``canary_leak`` gate needs ``eval.canaries``; canaries need a task that generates text."""
    if not parts.canaries_given:
        for i, threshold in parts.thresholds:
            if any(name == "canary_leak" for _, name in threshold.terms):
                yield CrossProblem(("objective", "thresholds", i),
                                   f"{str(threshold)!r}: canary_leak is only measured with eval.canaries set "
                                   "(e.g. eval: {canaries: {count: 4, repeat: 8}}): add it or drop the gate")
    elif parts.task is not None and parts.task not in CANARY_TASKS:
        yield CrossProblem(("eval", "canaries"),
                           f"the memorization probe applies to tasks that generate text ({', '.join(CANARY_TASKS)}); "
                           f"a {parts.task} model is trained on its label only, so a planted string is never "
                           "trained on as an answer and cannot come back: remove eval.canaries")


def classifier_head_problems(parts: SpecParts) -> Iterator[CrossProblem]:
    """``task.head: classifier`` trains a LoRA-shaped adapter and a score head with its own trainer: the
    settings that trainer does not honour are errors, not silently ignored."""
    if parts.head != "classifier":
        return
    train = parts.train
    shaped = [m for m in LORA_SHAPED if m not in QUANTIZED]
    if train is not None and train.method not in shaped:
        yield CrossProblem(("train", "method"),
                           f"head 'classifier' trains a LoRA-shaped adapter with the score head on an unquantized "
                           f"base; method {train.method!r} is not one: use {', '.join(shaped)} (or head: generate)")
    if train is not None and train.packing:
        yield CrossProblem(("train", "packing"), "packing does not apply to head 'classifier' (one prompt per "
                                                 "row, pooled at its last token): set packing: false")
    if train is not None and train.backend == "ray":
        yield CrossProblem(("train", "backend"), "head 'classifier' trains in one process: use backend: local "
                                                 "(or head: generate)")
    if train is not None and train.early_stopping is not None:
        yield CrossProblem(("train", "early_stopping"), "early stopping is not available with head 'classifier' "
                                                        "yet: remove it (or use head: generate)")
    if parts.search is not None:
        yield CrossProblem(("search",), "the hyperparameter search trains generative adapters: it is not "
                                        "available with head 'classifier' yet; remove the search section")
    if parts.retrieval_given:
        yield CrossProblem(("retrieval",), "the hybrid (retrieved examples in the prompt) is not available with "
                                           "head 'classifier' yet; remove the retrieval section")
