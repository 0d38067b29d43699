"""The one config loader of every entry point: plain YAML, every key and type checked.

detectron2's ``CfgNode.merge_from_file`` falls back to ``yaml.unsafe_load`` when a file
holds a python tag, so a downloaded config (or any ``_BASE_`` it names) could run code
(``SEED: !!python/object/apply:os.system [...]``), and an unknown key or a wrong type ends
in a long traceback from yacs. :func:`load_config` replaces both steps:

* every file is parsed with PyYAML's safe loader after refusing **any explicit tag**: a
  ``!!python/...`` tag is code, and the other tags (``!!binary``, ``!!set``, ``!custom``)
  make values no config key takes. Anchors, aliases and ``<<`` merge keys are plain YAML
  and allowed; a document that expands to more than :data:`MAX_VALUES` values (aliases of
  aliases, a "billion laughs" file) or that refers to itself is refused;
* ``_BASE_`` (a path or a list of paths, relative to the file that names it) must be a
  local file; cycles are refused;
* each key of each file is checked against the defaults (``add_hiervl_config(get_cfg())``)
  and each value against its default's type, naming the file and line, the key and the
  closest valid key; an int is accepted where a float is expected, a list for a tuple;
* command-line overrides (``KEY VALUE`` pairs, values read as Python literals like yacs
  does) get the same checks.

Every problem is a :class:`ConfigError` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import ast
import difflib
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from detectron2.config import CfgNode, get_cfg

from hiervl.config import add_hiervl_config

__all__ = ["ConfigError", "MAX_VALUES", "load_config", "merge_config_file", "merge_opts"]

BASE_KEY = "_BASE_"
# A config is a few hundred values; this bounds what aliases can expand to.
MAX_VALUES = 100_000
# A config is a few kB; anything this large is not one (and is not read into memory).
MAX_CONFIG_BYTES = 1 << 20
_PYTHON_TAG = "tag:yaml.org,2002:python/"
_YAML_TAG = "tag:yaml.org,2002:"
# The value types yacs accepts in a config.
_VALUE_TYPES = (tuple, list, str, int, float, bool, type(None))
_COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config file or override that cannot be used (one-line message naming where)."""


def load_config(config_file: str = "", opts: Sequence[Any] = ()) -> CfgNode:
    """HierVL's defaults, then ``config_file`` (with its ``_BASE_`` files), then ``opts``.

    Returns the (unfrozen) config. Raises :class:`ConfigError` for any problem.
    """
    cfg = add_hiervl_config(get_cfg())
    if config_file:
        merge_config_file(cfg, config_file)
    merge_opts(cfg, opts)
    return cfg


# ---------------------------------------------------------------------- files


def merge_config_file(cfg: CfgNode, path: str) -> None:
    """Merge ``path`` and its ``_BASE_`` chain (bases first) into ``cfg``, checking every key."""
    _merge_file(cfg, path, chain=())


def _merge_file(cfg: CfgNode, path: str, chain: Tuple[str, ...]) -> None:
    data, lines = _read_yaml(path)
    real = os.path.realpath(path)
    if BASE_KEY in data:
        bases = data.pop(BASE_KEY)
        where = f"{path}:{lines.get(BASE_KEY, 1)}"
        for base in bases if isinstance(bases, list) else [bases]:
            base_path = _resolve_base(base, path, where)
            if os.path.realpath(base_path) in chain + (real,):
                names = " -> ".join(os.path.basename(p) for p in chain + (real, base_path))
                raise ConfigError(f"{where}: _BASE_ {base!r} makes a cycle ({names})")
            _merge_file(cfg, base_path, chain + (real,))
    version = data.get("VERSION", cfg.VERSION)
    if version != cfg.VERSION:
        raise ConfigError(
            f"{path}:{lines.get('VERSION', 1)}: VERSION {version!r} configs are not supported; "
            f"HierVL configs are VERSION {cfg.VERSION}"
        )
    _apply(cfg, data, "", lambda key: f"{path}:{lines.get(key, 1)}")


def _resolve_base(base: Any, path: str, where: str) -> str:
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: _BASE_ must be a config file path, got {base!r}")
    if "://" in base:
        raise ConfigError(f"{where}: _BASE_ {base!r} must be a local file, not a URL")
    base = os.path.expanduser(base)
    return base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)


def _read_text(path: str) -> str:
    try:
        size = os.path.getsize(path)
        if os.path.isdir(path):
            raise ConfigError(f"config file {path} is a folder, not a file")
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {path} is {size} bytes, more than a config can be "
                f"({MAX_CONFIG_BYTES} bytes): not a config file?"
            )
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None


def _read_yaml(path: str) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """The file's top-level mapping and the 1-based line of every key path in it."""
    text = _read_text(path)
    try:
        _refuse_tags(text, path)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            # Before constructing: construction rewrites merge keys into the mapping nodes.
            lines: Dict[str, int] = {}
            _key_lines(node, "", lines, path)
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        line = _error_line(e, text)
        raise ConfigError(f"{path}:{line}: invalid YAML: {_yaml_problem(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: a config is a mapping of KEY: value lines, got a {type(data).__name__}"
        )
    _check_expanded_size(data, path)
    return data, lines


def _refuse_tags(text: str, path: str) -> None:
    """ConfigError at the first explicitly tagged node (events carry only explicit tags)."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        tag = getattr(event, "tag", None)
        if tag is None:
            continue
        where = f"{path}:{event.start_mark.line + 1}"
        if tag.startswith(_PYTHON_TAG):
            raise ConfigError(f"{where}: python tags are not allowed in configs")
        shown = "!!" + tag[len(_YAML_TAG) :] if tag.startswith(_YAML_TAG) else tag
        raise ConfigError(
            f"{where}: YAML tags ({shown}) are not allowed in configs; write the plain value"
        )


def _error_line(error: yaml.YAMLError, text: str) -> int:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(error, "position", None)  # ReaderError: bad characters
    return text[:position].count("\n") + 1 if isinstance(position, int) else 1


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    if problem:
        context = getattr(error, "context", None)
        return f"{context}, {problem}" if context else problem
    return " ".join(str(error).split())


def _check_expanded_size(data: Any, path: str) -> None:
    """Count values as if every alias were copied, without copying (memoised per object)."""
    sizes: Dict[int, int] = {}
    active: set = set()

    def size(obj: Any) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        key = id(obj)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{path}: an alias refers to itself (a recursive value)")
        active.add(key)
        items = list(obj.values()) if isinstance(obj, dict) else obj
        total = 1 + sum(size(item) for item in items)
        active.discard(key)
        sizes[key] = total
        if total > MAX_VALUES:
            raise ConfigError(
                f"{path}: the YAML expands to more than {MAX_VALUES} values (aliases of "
                "aliases?); a config has a few hundred"
            )
        return total

    size(data)


def _key_lines(node: Optional[yaml.Node], prefix: str, lines: Dict[str, int], path: str) -> None:
    """Record the line of each key (explicit keys before ``<<`` merged ones); refuse a key
    written twice in one mapping (YAML would silently keep the last one)."""
    if not isinstance(node, yaml.MappingNode):
        return
    merged = []
    seen: Dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _YAML_TAG + "merge":
            many = isinstance(value_node, yaml.SequenceNode)
            merged += value_node.value if many else [value_node]
            continue
        key = str(key_node.value)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"{path}:{line}: key {prefix}{key} is written twice in one mapping "
                f"(first on line {seen[key]}); YAML would keep only the last"
            )
        seen[key] = line
        lines[prefix + key] = line
        _key_lines(value_node, f"{prefix}{key}.", lines, path)
    for source in merged:
        sub: Dict[str, int] = {}
        _key_lines(source, prefix, sub, path)
        for key, line in sub.items():
            lines.setdefault(key, line)


# ---------------------------------------------------------------------- checking


def _all_keys(node: CfgNode, prefix: str = "") -> List[str]:
    keys = []
    for key, value in node.items():
        keys.append(prefix + key)
        if isinstance(value, CfgNode):
            keys += _all_keys(value, f"{prefix}{key}.")
    return keys


def closest_key(key: str, root: CfgNode) -> Optional[str]:
    """The valid key most like ``key`` (difflib), or None when nothing is close."""
    known = _all_keys(root)
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if match:
        return match[0]
    # A key at the wrong depth: compare the last component alone.
    last = key.rsplit(".", 1)[-1]
    by_last = {k.rsplit(".", 1)[-1]: k for k in reversed(known)}
    match = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)
    return by_last[match[0]] if match else None


def _unknown(where: str, key: str, root: CfgNode) -> ConfigError:
    best = closest_key(key, root)
    hint = f" (did you mean {best}?)" if best else ""
    return ConfigError(f"{where}: unknown config key {key}{hint}")


def _coerce(value: Any, default: Any, key: str, where: str) -> Any:
    """``value`` as the type of ``default`` (yacs' rules, plus int -> float), or ConfigError."""
    if type(value) is type(default) or default is None and isinstance(value, _VALUE_TYPES):
        return value
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(
        f"{where}: {key} must be of type {type(default).__name__} (default {default!r}), "
        f"got {type(value).__name__} {value!r}"
    )


def _apply(node: CfgNode, data: Dict[Any, Any], prefix: str, where_of, root=None) -> None:
    """Set ``data``'s values into ``node`` after checking each key and type."""
    root = node if root is None else root
    for key, value in data.items():
        full = f"{prefix}{key}"
        where = where_of(full)
        if not isinstance(key, str):
            raise ConfigError(f"{where}: config keys are names, got {key!r}")
        if key == BASE_KEY:
            raise ConfigError(f"{where}: {BASE_KEY} is only allowed at the top of a file")
        if key not in node:
            if node.is_new_allowed():
                node[key] = CfgNode(value) if isinstance(value, dict) else _literal(value)
                continue
            raise _unknown(where, full, root)
        current = node[key]
        # yacs reads string values as Python literals: "(512, 512)" is a tuple, "1e-4" a
        # float (YAML 1.1 reads both as strings).
        value = _literal(value)
        if isinstance(current, CfgNode):
            if not isinstance(value, dict):
                some = ", ".join(list(current)[:3])
                raise ConfigError(
                    f"{where}: {full} is a group of keys ({some}, ...), got {value!r}"
                )
            _apply(current, value, f"{full}.", where_of, root)
        elif isinstance(value, dict):
            raise ConfigError(
                f"{where}: {full} takes a value like {current!r}, not a group of keys"
            )
        else:
            node[key] = _coerce(value, current, full, where)


# ---------------------------------------------------------------------- command line


def _literal(value: Any) -> Any:
    """A command-line value as a Python literal when it is one, else the string (yacs)."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def merge_opts(cfg: CfgNode, opts: Sequence[Any]) -> None:
    """Merge ``KEY VALUE ...`` overrides (``train_net.py ... SOLVER.BASE_LR 1e-4``)."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(
            f"{_COMMAND_LINE}: overrides are KEY VALUE pairs; {opts[-1]!r} has no value"
        )
    for key, raw in zip(opts[0::2], opts[1::2]):
        where = _COMMAND_LINE
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: {key!r} is not a config key")
        if key == BASE_KEY:
            raise ConfigError(f"{where}: {BASE_KEY} is only allowed in config files")
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, CfgNode) else None
            if not isinstance(child, CfgNode):
                if part in node:
                    value_key = ".".join(parts[: depth + 1])
                    raise ConfigError(f"{where}: {value_key} is a value, it has no key {key}")
                raise _unknown(where, key, cfg)
            node = child
        prefix = "".join(f"{part}." for part in parts[:-1])
        _apply(node, {parts[-1]: raw}, prefix, lambda _key: _COMMAND_LINE, cfg)
