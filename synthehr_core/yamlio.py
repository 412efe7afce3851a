"""Reading a YAML config with bounds, before any Python object is built from it.

``yaml.safe_load`` runs no code, but a few hundred bytes of aliases (``b: [*a, *a, ...]`` nested a few times)
stand for billions of values: building, validating or printing them never ends. ``load_yaml`` checks the size of
the text, the number of aliases, the nesting depth and the number of values the document stands for (aliases
expanded, counted on the composed node graph without expanding it), and only then constructs the objects.
"""
from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 20         # 1 MiB; the bundled configs are < 10 KiB
MAX_ALIASES = 100           # the bundled configs use none
MAX_DEPTH = 32              # nesting of mappings and lists; the bundled configs nest 5 deep
MAX_VALUES = 200_000        # scalars, lists and mappings, with every alias expanded

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _mark(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def _expanded_values(root: yaml.Node, where: str) -> int:
    """How many values the node graph stands for with aliases expanded, memoised per node (linear time)."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            size[key] = min(1 + sum(size[id(c)] for c in children), MAX_VALUES + 1)
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{where}: a YAML alias refers to a value that contains it (a recursive "
                              "structure); a config cannot be recursive. Remove the alias.")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)
    return size[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml_file(path: str) -> Any:
    """``load_yaml`` of a local file or object-store URI; a local file's size is checked before it is read."""
    import os

    from . import storage

    if not storage.is_gcs(path) and os.path.isfile(path) and os.path.getsize(path) > MAX_BYTES:
        raise ConfigError(f"{path}: {os.path.getsize(path)} bytes is larger than a config may be ({MAX_BYTES} "
                          "bytes). Is this the right file?")
    return load_yaml(storage.read_bytes(path), str(path))


def load_yaml(text: str | bytes, where: str) -> Any:
    """Parse a YAML document (one) within the bounds above; any problem is one ConfigError naming ``where``."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{where}: {len(data)} bytes is larger than a config may be ({MAX_BYTES} bytes). "
                          "Is this the right file?")
    try:
        aliases = depth = deepest = 0
        for event in yaml.parse(data, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_ALIASES:
                    raise ConfigError(f"{where}: more than {MAX_ALIASES} YAML aliases (*name); a config needs few "
                                      "or none. Write the values out.")
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                deepest = max(deepest, depth)
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{where}: mappings and lists nested more than {MAX_DEPTH} deep; a config "
                                      "nests a few levels. Is this the right file?")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        node = yaml.compose(data, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_mark(exc)}. Fix the syntax.") from None
    if node is None:
        return None
    if aliases and _expanded_values(node, where) > MAX_VALUES:
        raise ConfigError(f"{where}: its YAML aliases expand to more than {MAX_VALUES} values (an alias bomb?); "
                          "a config is small. Write the values out without aliases.")
    loader = _Loader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_mark(exc)}. Fix the syntax.") from None
    finally:
        loader.dispose()
