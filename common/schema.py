"""Recipes as nested dataclasses, schema-free: YAML files with a `base:` chain, dotted overrides,
type coercion with one-line errors, did-you-mean for unknown keys, value bounds, and dumping.

The schema is whatever dataclass the caller passes: a field's type says what it takes (`int`,
`float`, `bool`, `str`, `Optional[...]`, `Tuple[float, float]`, `List[...]`, a nested dataclass
section), `Literal[...]` lists its choices, and `Annotated[int, POSITIVE]` (see the aliases below)
its bounds. Merge order: dataclass defaults < base chain (root first) < file < overrides. Each
layer (file or override) is checked on its own, so an unknown key or a wrong type names the file it
came from; `check_values` checks choices and bounds once on the merged result.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import re
import types
from collections.abc import Callable, Sequence
from typing import (
    Annotated,
    Any,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml

from common.errors import RecipeError

T = TypeVar("T")
COMMAND_LINE = "on the command line"  # where-phrase for override errors (files read "in <path>")


@dataclasses.dataclass(frozen=True)
class Bound:
    """A range a number must lie in; a value outside reads '<key> must be <words>, got <value>'."""

    words: str
    holds: Callable[[Any], bool]


POSITIVE = Bound("positive", lambda v: v > 0)
NON_NEGATIVE = Bound("non-negative", lambda v: v >= 0)
PROBABILITY = Bound("in [0, 1)", lambda v: 0 <= v < 1)

PositiveInt = Annotated[int, POSITIVE]
PositiveFloat = Annotated[float, POSITIVE]
NonNegativeInt = Annotated[int, NON_NEGATIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
Probability = Annotated[float, PROBABILITY]


# ------------------------------------------------------------------------------------------ YAML files


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`1e-4`) and booleans (true/false only); duplicate keys are errors."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2 booleans: only true/false, so `mode: off` or `name: no` stay strings (the "Norway problem").
_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def display(path: pathlib.Path) -> str:
    """A path as a person wants to read it: relative to the cwd when inside it, else absolute."""
    absolute = pathlib.Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(absolute)


def parse_yaml(text: str, prefix: str, with_line: bool = True) -> Any:
    """YAML text -> value; a syntax error becomes one line: `<prefix>[ line N]: <problem>`."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}" if mark is not None and with_line else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise RecipeError(f"{prefix}{line}: {problem}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{prefix}: {' '.join(str(exc).split())}") from None


def _read_file(path: pathlib.Path) -> dict[str, Any]:
    """One recipe file as a dict (empty file = {}); `base` stays in it."""
    where = f"in {display(path)}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {display(path)}: {exc}") from None
    data = parse_yaml(text, f"invalid YAML {where}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping of sections at the top level {where}, got {describe(data)}")
    return data


def candidates(name: str, search_dir: pathlib.Path) -> list[pathlib.Path]:
    """Where a recipe name may live: as given, then search_dir/NAME and search_dir/NAME.yaml."""
    paths = [pathlib.Path(name), search_dir / name]
    if not name.endswith((".yaml", ".yml")):
        paths.append(search_dir / f"{name}.yaml")
    return paths


def _resolve_base(base: Any, child: pathlib.Path, search_dir: pathlib.Path) -> pathlib.Path:
    """`base:` of `child`: relative to the child's folder first, then like a recipe name."""
    where = f"in {display(child)}"
    if not isinstance(base, str) or not base:
        raise RecipeError(f"wrong type for 'base' {where}: expected a recipe name or path, got {describe(base)}")
    found = [child.parent / base] + candidates(base, search_dir)
    for path in found:
        if path.is_file():
            return path
    looked = ", ".join(display(p) for p in found)
    raise RecipeError(f"base recipe '{base}' {where} not found: looked for {looked}")


def file_chain(path: pathlib.Path, search_dir: pathlib.Path) -> list[tuple[pathlib.Path, dict[str, Any]]]:
    """The recipe and its bases, root base first; a cycle is an error."""
    chain: list[tuple[pathlib.Path, dict[str, Any]]] = []
    seen: list[pathlib.Path] = []
    current: pathlib.Path | None = path
    while current is not None:
        real = current.resolve()
        if real in seen:
            raise RecipeError(f"cyclic base chain: {' -> '.join(display(p) for p in seen + [real])}")
        seen.append(real)
        data = _read_file(current)
        base = data.pop("base", None)  # `base: null` = no base
        chain.append((current, data))
        current = _resolve_base(base, current, search_dir) if base is not None else None
    return list(reversed(chain))


# ------------------------------------------------------------------------------------ the schema


class _Mismatch(Exception):
    """A value does not fit a field's type; turned into a RecipeError naming the key."""


def yaml_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (Annotated kept), for the fields that are YAML keys."""
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}


def _optional_inner(tp: Any) -> Any | None:
    """X for Optional[X] (or X | None), else None."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
    return None


def _members(tp: Any) -> tuple[Any, ...]:
    """The non-None members of a union of scalars (`PositiveInt | Literal["node"] | None`), else ()."""
    if get_origin(tp) in (Union, types.UnionType) and _optional_inner(tp) is None:
        return tuple(a for a in get_args(tp) if a is not type(None))
    return ()


def _unannotated(tp: Any) -> Any:
    """X for Annotated[X, ...]; Literal choices as their Python type."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is Literal:
        return type(get_args(tp)[0])
    return tp


def describe(value: Any) -> str:
    """A value as it would appear in YAML, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _expected(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_expected(inner)} or null"
    if _members(tp):
        none = " or null" if type(None) in get_args(tp) else ""
        return " or ".join(_expected(m) for m in _members(tp)) + none
    tp = _unannotated(tp)
    if get_origin(tp) is tuple:
        args = [_unannotated(a) for a in get_args(tp)]
        if all(a in (int, float) for a in args):
            return f"a list of {len(args)} numbers"
        return f"a list [{', '.join(_expected(a) for a in args)}]"
    if get_origin(tp) is list:
        return f"a list, each item {_expected(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a section (mapping of keys)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _convert_scalar(value: Any, tp: Any) -> Any:
    if isinstance(value, bool) != (tp is bool):
        raise _Mismatch
    if tp is bool or (tp is str and isinstance(value, str)):
        return value
    if tp is int and isinstance(value, int):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    raise _Mismatch


def _convert(value: Any, tp: Any, key: str, where: str, root: type) -> Any:
    """`value` as type `tp` (not Optional); raises _Mismatch, or RecipeError from inside a section."""
    if _members(tp):
        if value is None and type(None) in get_args(tp):
            return None
        for member in _members(tp):
            try:
                return _convert(value, member, key, where, root)
            except _Mismatch:
                pass
        raise _Mismatch
    tp = _unannotated(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if value is not None and not isinstance(value, dict):
            raise _Mismatch
        return clean_section(value or {}, tp, key, where, root)
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_convert_scalar(v, _unannotated(a)) for v, a in zip(value, args))
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_convert(v, get_args(tp)[0], key, where, root) for v in value]
    return _convert_scalar(value, tp)


def _coerce(value: Any, tp: Any, key: str, where: str, root: type) -> Any:
    inner = _optional_inner(tp)
    if inner is not None and value is None:
        return None
    try:
        return _convert(value, inner if inner is not None else tp, key, where, root)
    except _Mismatch:
        raise RecipeError(f"wrong type for '{key}' {where}: expected {_expected(tp)}, got {describe(value)}") from None


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema under `cls`, sections included."""
    keys = []
    for name, tp in yaml_fields(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(_unannotated(tp)):
            keys.extend(all_keys(_unannotated(tp), f"{dotted}."))
    return keys


def _unknown_key(key: Any, section: str, valid: Sequence[str], where: str, root: type) -> RecipeError:
    """Error for an unknown key, suggesting the closest sibling, else the closest key anywhere."""
    dotted = f"{section}.{key}" if section else str(key)
    match = difflib.get_close_matches(str(key), list(valid), n=1)
    if match:
        suggestion: str | None = f"{section}.{match[0]}" if section else match[0]
    else:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(all_keys(root))}
        leaf = difflib.get_close_matches(str(key), list(by_leaf), n=1, cutoff=0.8)
        suggestion = by_leaf[leaf[0]] if leaf else None
    if suggestion:
        return RecipeError(f"unknown key '{dotted}' {where}; did you mean '{suggestion}'?")
    scope = f"under '{section}'" if section else "at the top level"
    return RecipeError(f"unknown key '{dotted}' {where}; valid keys {scope}: {', '.join(valid)}")


def clean_section(raw: dict[Any, Any], cls: type, section: str, where: str, root: type | None = None) -> dict[str, Any]:
    """Check one layer's `section` against `cls`: unknown keys and types; values converted. `root`
    is the whole schema (default `cls`), where an unknown key's closest match is looked for."""
    fields = yaml_fields(cls)
    out = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(key, section, list(fields), where, root or cls)
        dotted = f"{section}.{key}" if section else key
        out[key] = _coerce(value, fields[key], dotted, where, root or cls)
    return out


# ------------------------------------------------------------------------------- merging and loading


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings; a list or scalar in `over` replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value read as YAML."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(f"override '{text}' is not of the form key.path=value (e.g. train.steps=100)")
    value = parse_yaml(raw, f"invalid value in override '{text}' {COMMAND_LINE}", with_line=False)
    for part in reversed(parts):
        value = {part: value}
    return value


def build(cls: type, tree: dict[str, Any]) -> Any:
    """An instance of `cls` from a cleaned tree; missing keys keep their defaults."""
    kwargs = {}
    for name, tp in yaml_fields(cls).items():
        if name in tree:
            section = _unannotated(tp)
            is_section = isinstance(section, type) and dataclasses.is_dataclass(section)
            kwargs[name] = build(section, tree[name]) if is_section else tree[name]
    return cls(**kwargs)


def load(cls: type, path: pathlib.Path, overrides: Sequence[str], search_dir: pathlib.Path) -> Any:
    """`cls` from a file (and its `base:` chain) plus `key.path=value` overrides; types checked per layer."""
    merged: dict[str, Any] = {}
    for file, data in file_chain(path, search_dir):
        merged = _merge(merged, clean_section(data, cls, "", f"in {display(file)}"))
    for text in overrides:
        merged = _merge(merged, clean_section(_parse_override(text), cls, "", COMMAND_LINE))
    return build(cls, merged)


def from_dict(cls: Any, tree: dict[str, Any], section: str, where: str) -> Any:
    """One section (e.g. a recipe's stored in a checkpoint) checked against its schema."""
    return build(cls, clean_section(tree, cls, section, where))


# ------------------------------------------------------------------------------------------ values


def check_values(obj: Any, prefix: str = "") -> None:
    """Choices (Literal) and bounds (Annotated) of every field, sections included; None (an unset
    optional) is skipped."""
    for name, tp in yaml_fields(type(obj)).items():
        key, value = f"{prefix}{name}", getattr(obj, name)
        union = _members(_optional_inner(tp) or tp)  # the member the value was converted as
        tp = next((m for m in union if type(value) is _unannotated(m)), _optional_inner(tp) or tp)
        if value is None:
            continue
        if dataclasses.is_dataclass(_unannotated(tp)):
            check_values(value, f"{key}.")
            continue
        for bound in get_args(tp)[1:] if get_origin(tp) is Annotated else ():
            if isinstance(bound, Bound) and not bound.holds(value):
                raise RecipeError(f"{key} must be {bound.words}, got {value}")
        choices = get_args(tp) if get_origin(tp) is Literal else ()
        if choices and value not in choices:
            raise RecipeError(
                f"{key} must be one of {' | '.join(choices)}{' or a number' * bool(union)}, got '{value}'"
            )
        item = get_args(tp)[0] if get_origin(tp) is list else None
        item_choices = get_args(item) if get_origin(item) is Literal else ()
        for i, v in enumerate(value if item_choices else ()):
            if v not in item_choices:
                raise RecipeError(f"{key}[{i}] must be one of {' | '.join(item_choices)}, got '{v}'")


def choices_of(cls: type, name: str) -> tuple[str, ...]:
    """The choices of a Literal field (for messages and tests)."""
    tp = yaml_fields(cls)[name]
    tp = _optional_inner(tp) or tp
    return get_args(tp)


# ------------------------------------------------------------------------------------------- dumping


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) of every YAML key, in schema order."""
    out = {}
    for name, tp in yaml_fields(type(obj)).items():
        value = getattr(obj, name)
        out[name] = to_dict(value) if dataclasses.is_dataclass(_unannotated(tp)) else _plain(value)
    return out


class _Dumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (`betas: [0.9, 0.95]`), as recipes are written by hand."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def dump(obj: Any) -> str:
    """The whole object as YAML, in schema order; `load` reads it back to an equal object."""
    return yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
