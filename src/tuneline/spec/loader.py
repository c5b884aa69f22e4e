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


def parse_spec(text: str, where: str = "<spec>") -> Spec:
    """Parse and validate spec text; raise :class:`SpecError` listing every problem."""
    try:
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
