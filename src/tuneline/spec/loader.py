"""Load ``tuneline.yaml`` into a :class:`Spec`, reporting every problem with its line."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneline.errors import Problem, SpecError
from tuneline.spec.models import Spec

Loc = tuple[str | int, ...]


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
    model: Any = Spec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


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
            Problem(message=msg, where=f"{where}:{line}" if line else where, field=_format_loc(loc) or None, hint=hint)
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


def check_yaml_structure(text: str, where: str = "<yaml>") -> None:
    """Refuse YAML that would make a loader recurse forever or blow up: an alias inside the value
    its anchor names (``a: &x [*x]``, ``a: &x {<<: *x}``: a loop), more than
    :data:`MAX_YAML_VALUES` values once aliases are expanded, or nesting deeper than
    :data:`MAX_YAML_DEPTH`. Raises :class:`SpecError` naming the file and line; syntax errors are
    left to the YAML loader (``yaml.YAMLError``).

    Read from the event stream, before anything is composed: an alias can only name an anchor
    defined before it, so a loop is exactly an alias met while its anchor's value is still open.
    """
    title = f"{where} is not a valid spec"
    open_anchors: dict[str, _Frame] = {}  # anchor -> its collection, while that is open
    sizes: dict[str, int] = {}  # anchor -> values it expands to
    stack: list[_Frame] = []

    def add(n: int, line: int) -> None:
        if stack:
            stack[-1].values += n
            if stack[-1].values > MAX_YAML_VALUES:
                raise SpecError(Problem(f"the YAML expands to more than {MAX_YAML_VALUES:,} values through its "
                                        "aliases", where=f"{where}:{line}",
                                        hint="write the values out instead of repeating them with aliases"),
                                title=title)

    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        line = ev.start_mark.line + 1 if ev.start_mark is not None else 0
        if isinstance(ev, yaml.CollectionStartEvent):
            if len(stack) >= MAX_YAML_DEPTH:
                raise SpecError(Problem(f"nested more than {MAX_YAML_DEPTH} levels deep", where=f"{where}:{line}",
                                        hint="a spec needs a few levels of mappings and lists"), title=title)
            frame = _Frame(ev.anchor, 1, line)
            if ev.anchor is not None:
                open_anchors[ev.anchor] = frame
            stack.append(frame)
        elif isinstance(ev, yaml.CollectionEndEvent):
            frame = stack.pop()
            if frame.anchor is not None:
                sizes[frame.anchor] = frame.values
                if open_anchors.get(frame.anchor) is frame:
                    del open_anchors[frame.anchor]
            add(frame.values, line)
        elif isinstance(ev, yaml.ScalarEvent):
            if ev.anchor is not None:
                sizes[ev.anchor] = 1
                open_anchors.pop(ev.anchor, None)  # the name now means this scalar
            add(1, line)
        elif isinstance(ev, yaml.AliasEvent):
            anchor = str(ev.anchor)
            if anchor in open_anchors:
                raise SpecError(Problem(
                    f"the alias *{anchor} is inside the value its anchor &{anchor} (line "
                    f"{open_anchors[anchor].line}) names: a loop", where=f"{where}:{line}",
                    hint="an alias can repeat a value defined before it, not the value it is part of"), title=title)
            add(sizes.get(anchor, 1), line)


def parse_spec(text: str, where: str = "<spec>") -> Spec:
    """Parse and validate spec text; raise :class:`SpecError` listing every problem."""
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
    lines: dict[Loc, int] = {}
    if node is not None:
        _line_index(node, (), lines)
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problems_from_validation(err, lines, where), title=f"{where} is not a valid spec") from None


def load_spec(path: str | Path) -> LoadedSpec:
    """Read ``path`` and validate it. Raises :class:`SpecError` with every problem at once."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(Problem("spec file not found", where=str(p),
                                hint="pass the path to a tuneline.yaml, e.g. examples/banking77/tuneline.yaml"))
    text = p.read_text(encoding="utf-8")
    return LoadedSpec(spec=parse_spec(text, where=str(p)), path=p.resolve(), text=text)


def json_schema() -> dict[str, Any]:
    """JSON Schema of tuneline.yaml, for editors."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tuneline.yaml"
    return schema
