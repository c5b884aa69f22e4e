"""What a comparison will train: the combinations of ``--models`` and ``--methods``, each the spec
with ``model``, ``train.method`` (and a learning rate that suits the method) replaced, checked
before anything is trained.

A method other than the spec's own gets the spec's learning rate scaled by :data:`LR_FACTOR` (its
usual learning rate relative to LoRA's), unless ``--set train.lr=...`` (or ``--set
METHOD:train.lr=...``) gives one: LoRA, DoRA and rsLoRA train low-rank updates of the same size
and share one; IA3's rescaling vectors and the virtual tokens of prefix and prompt tuning are few
parameters with a small effect each, which the PEFT papers and peft's examples train with 10-30x
LoRA's rate (prompt tuning the most); full fine-tuning moves every weight and wants about a tenth.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneline.compare.results import GENERATIVE, Combination
from tuneline.errors import ModelError, Problem, SpecError
from tuneline.models.sources import BUILTIN_MODELS, ModelSource, resolve_model_source
from tuneline.spec.dotted import set_path
from tuneline.spec.loader import LoadedSpec, parse_spec
from tuneline.spec.methods import TRAIN_METHODS
from tuneline.spec.models import Spec, TrainSpec

# usual learning rate relative to LoRA's (see the module docstring); a method not listed: 1
LR_FACTOR: dict[str, float] = {"lora": 1.0, "dora": 1.0, "rslora": 1.0, "ia3": 10.0, "prefix": 10.0,
                               "prompt": 30.0, "full": 0.1}
MAX_DEFAULT_LR = 0.3  # a scaled default never goes above this (the highest prompt-tuning rates in use)

# names --methods accepts that choose a head rather than a method: name -> (method, head)
HEADS: dict[str, tuple[str, str]] = {"classifier": ("lora", "classifier")}
# the heads that need a classification task
CLASSIFICATION_HEADS = ("classifier",)
# spec paths --set may not change: --models and --methods say them
FIXED_PATHS = ("model", "train.method", "task.head", "name")


@dataclass(frozen=True)
class Override:
    """``--set [METHOD:]PATH=VALUE``: ``value`` (YAML) at spec path ``path``, for every combination or
    only those training with ``method``."""

    path: str
    value: object
    method: str | None = None

    def applies(self, method: str) -> bool:
        return self.method is None or self.method == method


@dataclass(frozen=True)
class Planned:
    """One combination, its spec and where its base model comes from."""

    combination: Combination
    spec: Spec
    source: ModelSource
    lr_source: str  # spec | --set | default for the method (LR_FACTOR x the spec's)


def _refuse(message: str, field: str, hint: str) -> SpecError:
    return SpecError(Problem(message, field=field, hint=hint), title="tuneline compare cannot start")


def split_list(text: str | None) -> list[str]:
    """``a,b, c`` -> ``[a, b, c]`` (empty entries and repeats dropped, order kept)."""
    out: list[str] = []
    for part in (text or "").split(","):
        if (p := part.strip()) and p not in out:
            out.append(p)
    return out


def parse_methods(names: list[str]) -> list[tuple[str, str]]:
    """``--methods`` as (method, head) pairs; an unknown name is an error naming the known ones."""
    known = [*TRAIN_METHODS, *HEADS]
    out = []
    for name in names:
        if name == "dpo":  # its preference phase runs in `tuneline run` (pipeline stages), not here
            raise _refuse("dpo is not compared: compare the methods of its first phase (lora), then run the dpo "
                          "spec", "--methods", "drop dpo from --methods")
        if name in HEADS:
            out.append(HEADS[name])
        elif name in TRAIN_METHODS:
            out.append((name, GENERATIVE))
        else:
            close = difflib.get_close_matches(name, known, n=1)
            raise _refuse(f"unknown method {name!r}", "--methods",
                          (f"did you mean {close[0]!r}? " if close else "") + f"known: {', '.join(known)}")
    return out


def parse_overrides(items: list[str], methods: list[str]) -> list[Override]:
    """``--set`` items: ``PATH=VALUE`` for every combination, ``METHOD:PATH=VALUE`` for one method."""
    out = []
    for item in items:
        target, eq, raw = item.partition("=")
        if not eq or not target.strip():
            raise _refuse(f"--set {item!r} is not PATH=VALUE", "--set", "e.g. --set train.max_steps=200 or "
                                                                           "--set ia3:train.lr=5e-3")
        method, colon, path = target.strip().rpartition(":")
        if colon and method not in methods:
            raise _refuse(f"--set {item!r} names method {method!r}, which --methods does not list", "--set",
                          f"compared methods: {', '.join(methods)}")
        if path in FIXED_PATHS:
            raise _refuse(f"--set cannot change {path}", "--set", "choose models with --models and methods with "
                                                                  "--methods")
        out.append(Override(path, _value(raw), method or None))
    return out


def _value(raw: str) -> object:
    """A --set value as YAML reads it, and a number written like ``5e-3`` (a string to YAML 1.1) as one."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def default_lr(train: TrainSpec, method: str) -> float:
    """The learning rate ``method`` trains with when nothing sets one: the spec's own for its own
    method, else the spec's scaled by :data:`LR_FACTOR` (at most :data:`MAX_DEFAULT_LR`)."""
    if method == train.method:
        return train.lr
    scaled = train.lr * LR_FACTOR.get(method, 1.0) / LR_FACTOR.get(train.method, 1.0)
    return min(max(MAX_DEFAULT_LR, train.lr), scaled)


def model_ref(ref: str) -> str:
    """A ``--models`` entry as the derived spec names it: an existing path made absolute (it was
    given relative to where the command runs, not to the spec)."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if ref not in BUILTIN_MODELS and path.exists() else ref


def display_model(ref: str) -> str:
    """A model as the table names it: an alias or hub id as given, a path by its last part."""
    path = Path(ref).expanduser()
    return path.name if ref not in BUILTIN_MODELS and (path.is_absolute() or path.exists()) else ref


def _check_head(spec: Spec, head: str) -> None:
    if head == GENERATIVE:
        return
    if head in CLASSIFICATION_HEADS and spec.task.type != "classification":
        raise _refuse(f"the {head} head needs a classification task, and this spec's task is {spec.task.type!r}",
                      "--methods", f"drop {head} from --methods (a {spec.task.type} task is answered by generation)")



def _derived(loaded: LoadedSpec, model: str, method: str, head: str,
             overrides: list[Override]) -> tuple[Spec, str]:
    """The spec of one combination (validated with every cross-field rule) and its lr's source."""
    spec = loaded.spec
    data = spec.model_dump(mode="json")
    data["model"] = model_ref(model)
    data["train"]["method"] = method
    data["train"]["lr"] = default_lr(spec.train, method)
    data["search"] = None  # the spec's configuration is compared, not searched
    if head != GENERATIVE:
        data["task"]["head"] = head
    lr_source = "spec" if method == spec.train.method else f"default for {method}"
    for o in overrides:
        if o.applies(method):
            try:
                data = set_path(data, o.path, o.value)
            except KeyError:
                raise _refuse(f"--set {o.path}: no such field in the spec", "--set",
                              "give a dotted path of the spec, e.g. train.max_steps or train.lora.r") from None
            lr_source = "--set" if o.path == "train.lr" else lr_source
    label = Combination(display_model(model), method, head).label
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    try:
        return parse_spec(text), lr_source
    except SpecError as e:  # the derived text's lines mean nothing to the user: name the spec and the option
        problems = [Problem(p.message, where=f"{loaded.path.name} with {label}", field=p.field,
                            hint=(f"{p.hint}; " if p.hint else "") + "change it in the spec, or for this method "
                                 f"alone with --set {method}:PATH=VALUE") for p in e.problems]
        raise SpecError(problems, title=f"the spec with {label} is not valid") from None


def plan(loaded: LoadedSpec, models: list[str], methods: list[str], overrides: list[str]) -> list[Planned]:
    """Every combination of ``models`` and ``methods``, each spec checked and each model resolved;
    any problem raises before anything is trained."""
    spec = loaded.spec
    if spec.retrieval is not None:
        raise _refuse("compare trains and scores the model alone; this spec's retrieval section (the hybrid) is "
                      "not compared", "retrieval", "compare a copy of the spec without the retrieval section")
    pairs = parse_methods(methods)
    for _, head in pairs:
        _check_head(spec, head)
    sets = parse_overrides(overrides, methods)
    sources = {}
    for model in models:
        try:
            sources[model] = resolve_model_source(model_ref(model), loaded.base_dir)
        except ModelError as e:
            raise ModelError(e.problems, title=f"model {model!r} (--models) does not resolve") from None
    out = []
    for model in models:
        for method, head in pairs:
            derived, lr_source = _derived(loaded, model, method, head, sets)
            out.append(Planned(Combination(display_model(model), method, head), derived, sources[model], lr_source))
    return out
