"""Load ``tuneline.yaml`` into a :class:`Spec`, reporting every problem with its line."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tuneline.errors import Problem, SpecError
from tuneline.spec.checks import CrossProblem, Loc, SpecParts, cross_field_problems, format_loc
from tuneline.spec.gates import Threshold
from tuneline.spec.metrics import TASK_METRICS
from tuneline.spec.models import (
    CROSS_CHECKS_LATER,
    CurationSpec,
    DataSource,
    GoldenSetSpec,
    SearchSpec,
    Spec,
    TrainSpec,
)


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and where it came from."""

    spec: Spec
    path: Path
    text: str

    @property
    def base_dir(self) -> Path:
        """Directory that relative data paths in the spec are resolved against."""
        return self.path.parent

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def resolve(self, relative: str) -> Path:
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def canonical_json(self) -> str:
        return json.dumps(self.spec.model_dump(mode="json"), sort_keys=True)


def _line_index(node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    """Record the 1-based line of every mapping key and sequence item under ``node``."""
    out.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*loc, key)] = key_node.start_mark.line + 1
            _line_index(value_node, (*loc, key), out)
            # keep the key's own line for the key, but let children find theirs
            out[(*loc, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*loc, i)] = item.start_mark.line + 1
            _line_index(item, (*loc, i), out)


def _nearest_line(lines: dict[Loc, int], loc: Loc) -> int | None:
    while True:
        if loc in lines:
            return lines[loc]
        if not loc:
            return None
        loc = loc[:-1]


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for 'did you mean')."""
    model: type[BaseModel] | None = Spec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _problems_from_validation(err: ValidationError, lines: dict[Loc, int], where: str) -> list[Problem]:
    problems = []
    for e in err.errors():
        # drop pydantic's internal union/validator tags from the location
        loc: Loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        line = _nearest_line(lines, loc)
        hint = None
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
            owner = _model_at(loc)
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(owner.model_fields)}"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        problems.append(
            Problem(message=msg, where=f"{where}:{line}" if line else where, field=format_loc(loc) or None, hint=hint)
        )
    return problems


@dataclass
class _Frame:
    """A mapping or list being read: its anchor, the values in it so far, its line."""

    anchor: str | None
    values: int
    line: int


MAX_YAML_DEPTH = 100  # nested mappings and lists: a spec needs fewer than 10
MAX_YAML_VALUES = 100_000  # values after every alias is expanded (a "billion laughs" stays out)


class _StructureCheck:
    """Reads YAML events, tracking the open collections, the anchors whose value is still open, and
    how many values each anchor expands to."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.open_anchors: dict[str, _Frame] = {}  # anchor -> its collection, while that is open
        self.sizes: dict[str, int] = {}  # anchor -> values it expands to
        self.stack: list[_Frame] = []

    def refuse(self, message: str, line: int, hint: str) -> SpecError:
        return SpecError(Problem(message, where=f"{self.where}:{line}", hint=hint),
                         title=f"{self.where} is not a valid spec")

    def add(self, n: int, line: int) -> None:
        if self.stack:
            self.stack[-1].values += n
            if self.stack[-1].values > MAX_YAML_VALUES:
                raise self.refuse(f"the YAML expands to more than {MAX_YAML_VALUES:,} values through its aliases",
                                  line, "write the values out instead of repeating them with aliases")

    def start(self, anchor: str | None, line: int) -> None:
        if len(self.stack) >= MAX_YAML_DEPTH:
            raise self.refuse(f"nested more than {MAX_YAML_DEPTH} levels deep", line,
                              "a spec needs a few levels of mappings and lists")
        frame = _Frame(anchor, 1, line)
        if anchor is not None:
            self.open_anchors[anchor] = frame
        self.stack.append(frame)

    def end(self, line: int) -> None:
        frame = self.stack.pop()
        if frame.anchor is not None:
            self.sizes[frame.anchor] = frame.values
            if self.open_anchors.get(frame.anchor) is frame:
                del self.open_anchors[frame.anchor]
        self.add(frame.values, line)

    def scalar(self, anchor: str | None, line: int) -> None:
        if anchor is not None:
            self.sizes[anchor] = 1
            self.open_anchors.pop(anchor, None)  # the name now means this scalar
        self.add(1, line)

    def alias(self, anchor: str, line: int) -> None:
        if anchor in self.open_anchors:
            raise self.refuse(f"the alias *{anchor} is inside the value its anchor &{anchor} (line "
                              f"{self.open_anchors[anchor].line}) names: a loop", line,
                              "an alias can repeat a value defined before it, not the value it is part of")
        self.add(self.sizes.get(anchor, 1), line)

    def event(self, ev: yaml.Event) -> None:
        line = ev.start_mark.line + 1 if ev.start_mark is not None else 0
        if isinstance(ev, yaml.CollectionStartEvent):
            self.start(ev.anchor, line)
        elif isinstance(ev, yaml.CollectionEndEvent):
            self.end(line)
        elif isinstance(ev, yaml.ScalarEvent):
            self.scalar(ev.anchor, line)
        elif isinstance(ev, yaml.AliasEvent):
            self.alias(str(ev.anchor), line)


def check_yaml_structure(text: str, where: str = "<yaml>") -> None:
    """Refuse YAML that would make a loader recurse forever or blow up: an alias inside the value
    its anchor names (``a: &x [*x]``, ``a: &x {<<: *x}``: a loop), more than
    :data:`MAX_YAML_VALUES` values once aliases are expanded, or nesting deeper than
    :data:`MAX_YAML_DEPTH`. Raises :class:`SpecError` naming the file and line; syntax errors are
    left to the YAML loader (``yaml.YAMLError``).

    Read from the event stream, before anything is composed: an alias can only name an anchor
    defined before it, so a loop is exactly an alias met while its anchor's value is still open.
    """
    check = _StructureCheck(where)
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        check.event(ev)


M = TypeVar("M", bound=BaseModel)


def _valid(model: type[M], raw: object) -> M | None:
    """``raw`` as a ``model``, or None where it does not validate (its field errors say why)."""
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def _mapping(raw: object, key: str) -> dict[str, object]:
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, dict) else {}


def _list(raw: dict[str, object], key: str) -> list[object]:
    value = raw.get(key)
    return value if isinstance(value, list) else []


def _golden_name(raw: object) -> str | None:
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) else None


def _parsed_thresholds(objective: dict[str, object]) -> tuple[tuple[int, Threshold], ...]:
    out: list[tuple[int, Threshold]] = []
    for i, text in enumerate(_list(objective, "thresholds")):
        try:
            out.append((i, Threshold.parse(str(text))))
        except ValueError:
            continue  # a field error already
    return tuple(out)


def _sources(data: dict[str, object], golden: list[object]) -> tuple[tuple[Loc, DataSource], ...]:
    out: list[tuple[Loc, DataSource]] = []
    for split in ("train", "eval", "test"):
        if data.get(split) is not None and (src := _valid(DataSource, data[split])) is not None:
            out.append((("data", split), src))
    for i, raw in enumerate(golden):
        if (g := _valid(GoldenSetSpec, raw)) is not None:
            out.append((("eval", "golden", i), g))
    return tuple(out)


def parts_from_data(data: dict[str, object]) -> SpecParts:
    """The parts of a spec that validate on their own, from its YAML data: the cross-field rules
    read them while other fields are still wrong."""
    task = _mapping(data, "task").get("type")
    objective = _mapping(data, "objective")
    primary = objective.get("primary")
    golden = _list(_mapping(data, "eval"), "golden")
    names = tuple(_golden_name(g) for g in golden)
    search = data.get("search")
    head = _mapping(data, "task").get("head")
    return SpecParts(
        task=task if isinstance(task, str) and task in TASK_METRICS else None,
        primary=primary if isinstance(primary, str) else None,
        thresholds=_parsed_thresholds(objective), golden_names=names,
        sources=_sources(_mapping(data, "data"), golden),
        curation=_valid(CurationSpec, data.get("curation") or {}),
        train=_valid(TrainSpec, data.get("train") or {}),
        search=_valid(SearchSpec, search) if search is not None else None,
        canaries_given=_mapping(data, "eval").get("canaries") is not None,
        preferences_given=_mapping(data, "data").get("preferences") is not None,
        head=head if isinstance(head, str) else None, retrieval_given=data.get("retrieval") is not None)


def _located(problems: list[CrossProblem], lines: dict[Loc, int], where: str) -> list[Problem]:
    out = []
    for p in problems:
        line = _nearest_line(lines, p.loc)
        out.append(Problem(message=p.message, where=f"{where}:{line}" if line else where, field=format_loc(p.loc)))
    return out


def _line_of(problem: Problem) -> int:
    tail = (problem.where or "").rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


def parse_spec(text: str, where: str = "<spec>") -> Spec:
    """Parse and validate spec text; raise :class:`SpecError` listing every problem: field errors
    and problems across fields together, in the order of their lines."""
    data, node = _read_yaml(text, where)
    lines: dict[Loc, int] = {}
    if node is not None:
        _line_index(node, (), lines)
    spec: Spec | None = None
    problems: list[Problem] = []
    try:
        spec = Spec.model_validate(data, context={CROSS_CHECKS_LATER: True})
    except ValidationError as err:
        problems = _problems_from_validation(err, lines, where)
    parts = SpecParts.of(spec) if spec is not None else parts_from_data(data)
    problems += _located(cross_field_problems(parts), lines, where)
    if problems or spec is None:
        raise SpecError(sorted(problems, key=_line_of), title=f"{where} is not a valid spec")
    return spec


def _read_yaml(text: str, where: str) -> tuple[dict[str, object], yaml.Node | None]:
    """The YAML mapping of ``text`` and its node tree (for lines); SpecError when it is not one."""
    try:
        check_yaml_structure(text, where)
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SpecError(
            Problem(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=f"{where}{line}",
                    hint="check indentation and quoting"),
            title=f"{where} is not a valid spec",
        ) from None
    if not isinstance(data, dict):
        raise SpecError(
            Problem("the spec must be a YAML mapping with fields such as name, task, model, data",
                    where=where),
            title=f"{where} is not a valid spec",
        )
    return data, node


def load_spec(path: str | Path) -> LoadedSpec:
    """Read ``path`` and validate it. Raises :class:`SpecError` with every problem at once."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(Problem("spec file not found", where=str(p),
                                hint="pass the path to a tuneline.yaml, e.g. examples/banking77/tuneline.yaml"))
    text = p.read_text(encoding="utf-8")
    return LoadedSpec(spec=parse_spec(text, where=str(p)), path=p.resolve(), text=text)


def json_schema() -> dict[str, object]:
    """JSON Schema of tuneline.yaml, for editors."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tuneline.yaml"
    return schema
