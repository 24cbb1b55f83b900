"""Fingerprints: what determines a run, as JSON, and the differences between two.

A run resumed from a checkpoint should be the run that wrote it: the same
optimizer with the same hyperparameters, the same data. :func:`fingerprint`
describes an object (an optax optimizer, a schedule, a config) as a JSON-able
structure, and :func:`differences` turns two of them into lines a person reads:

    optimizer: chain[1] > scale > step_size: -0.001 in the checkpoint, -0.01 now

An optax optimizer is a NamedTuple of ``init`` and ``update`` closures, so its
hyperparameters live in closure cells. A function is described by its module and
qualified name, its closure cells, its defaults and the float constants of its
code (so ``lambda step: 1e-3`` differs from ``lambda step: 1e-2``), recursively,
with a guard against cycles and a depth limit. The code itself is not described:
editing a function's body without changing those goes unnoticed.

What a description holds:

* ``None``, bools, ints, finite floats and strings as themselves; lists and
  tuples as JSON lists; dicts with string keys as JSON objects, sorted by key.
* Every other kind as a JSON object whose ``"type"`` names it: ``function``,
  ``namedtuple``, ``dataclass``, ``array`` (shape, dtype, a CRC-32 of the bytes up
  to 1 MiB and the values of up to 8 elements), ``partial``, ``method``,
  ``callable``, ``class``, ``module``, ``enum``, ``dtype``, ``float`` (NaN and
  infinities, which JSON lacks), ``complex``, ``bytes``, ``set``, ``sequence`` (a
  list longer than 64 items: its length and a CRC-32), ``dict`` (a dict with keys
  that are not strings, or with a key ``"type"``), and ``object``: one it cannot
  describe, known by its type's name only.
* Markers: ``cycle`` (an object inside itself), ``truncated`` (beyond the depth
  limit), ``empty_cell`` and ``same_as``: a subtree equal to one earlier in the
  description, given as ``up`` levels then down a ``path`` of JSON keys and list
  indices (relative, so it survives being put inside a larger dict), which keeps it
  small where optax closes over the same function twice.

Nothing depends on where objects live in memory or on the order of a set, so the
same objects give the same JSON in every process (of the same Python and library
versions: a library's internals are part of what is described).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import types
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnnet.train._record import path_str as _path_str


def _crc32(host: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(host).reshape(-1).view(np.uint8))


_MAX_DEPTH = 32
_CHECKSUM_BYTES = 1 << 20  # larger arrays get shape and dtype only: no device read
_ARRAY_VALUES = 8  # arrays this small also record their values, to show in differences
_LONG_SEQUENCE = 64
_SHOW_CHARS = 80
_KINDS = frozenset(
    {
        "array", "bytes", "callable", "class", "complex", "cycle", "dataclass", "dict",
        "dtype", "empty_cell", "enum", "float", "function", "method", "module",
        "namedtuple", "object", "partial", "same_as", "sequence", "set", "truncated",
    }
)  # fmt: skip


def fingerprint(obj: Any, *, max_depth: int = _MAX_DEPTH) -> Any:
    """A deterministic, JSON-able description of what ``obj`` would make a run do.

    Args:
      obj: anything: an optax ``GradientTransformation``, a schedule, a config dict,
        arrays, or a dict of several (``{"optimizer": tx, "model": config}``).
      max_depth: how many levels of nesting are followed; deeper objects are
        recorded as ``{"type": "truncated", "name": <their type>}``.

    Returns:
      Nested dicts, lists, strings, numbers, bools and None (see the module
      docstring); ``json.dumps`` writes it and ``json.loads`` reads back an equal
      value. Two separately built ``optax.adam(1e-3)`` give equal fingerprints, in
      one process or two.
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
        raise ValueError(f"max_depth must be a positive integer, got {max_depth!r}")
    return _deduplicate(_Walker(max_depth).describe(obj, 0))


def data_fingerprint(tree: Any, *, examples: bool = True) -> dict[str, dict]:
    """Describes a dataset by its leaves' shapes and dtypes, not its contents.

    Reading every byte of a dataset to fingerprint it would cost as much as an
    epoch; shapes and dtypes catch the usual mistake (another dataset, another
    split, another preprocessing) for free. For NumPy arrays, which are in host
    memory, the first and the last example (along the leading axis) are also
    checksummed, which catches a reordered or regenerated dataset of the same shape
    in most cases, though not a change in the middle alone. JAX arrays get shape
    and dtype only: checksumming them would read them back from the device, and
    an array split over several processes cannot be read by one.

    Args:
      tree: a pytree of arrays, such as ``(x, y)``.
      examples: whether to checksum the first and last example of NumPy arrays.

    Returns:
      ``{leaf path: {"shape": [...], "dtype": "float32"}}`` (paths as checkpoints
      write them, ``"0/images"``; ``"(root)"`` for a tree that is one array), plus
      ``"first_crc32"`` and ``"last_crc32"`` for NumPy arrays with examples.
      :func:`differences` compares two of them.
    """
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            leaf = np.asarray(leaf)
        entry: dict[str, Any] = {"shape": [int(d) for d in leaf.shape], "dtype": str(leaf.dtype)}
        if (
            examples
            and isinstance(leaf, np.ndarray)
            and leaf.ndim
            and leaf.shape[0]
            and not leaf.dtype.hasobject
        ):
            entry["first_crc32"] = _crc32(leaf[0])
            entry["last_crc32"] = _crc32(leaf[-1])
        out[_path_str(keypath) or "(root)"] = entry
    return out


# Describing.


class _Walker:
    """One description: the cycle guard and a memo of functions already described."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.active: set[int] = set()  # ids of the objects being described (ancestors)
        self.memo: dict[int, Any] = {}  # id of a function -> its description
        self.cycles = 0  # cycle markers made so far; a description with one is not memoized

    def describe(self, obj: Any, depth: int) -> Any:
        simple = _simple(obj)
        if simple is not _NOT_SIMPLE:
            return simple
        if depth > self.max_depth:
            return {"type": "truncated", "name": _type_name(obj)}
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        if key in self.active:
            self.cycles += 1
            return {"type": "cycle", "name": _callable_name(obj) or _type_name(obj)}
        self.active.add(key)
        cycles = self.cycles
        try:
            out = self._compound(obj, depth + 1)
        finally:
            self.active.discard(key)
        if isinstance(obj, types.FunctionType) and self.cycles == cycles:
            self.memo[key] = out
        return out

    def _compound(self, obj: Any, depth: int) -> Any:
        describe = functools.partial(self.describe, depth=depth)
        if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
            fields = {name: describe(getattr(obj, name)) for name in type(obj)._fields}
            return {"type": "namedtuple", "name": _qualified(type(obj)), "fields": fields}
        if isinstance(obj, (list, tuple)):
            items = [describe(item) for item in obj]
            if len(items) > _LONG_SEQUENCE:
                return {"type": "sequence", "length": len(items), "crc32": _json_crc(items)}
            return items
        if isinstance(obj, (set, frozenset)):
            return {"type": "set", "items": sorted((describe(x) for x in obj), key=_canonical)}
        if isinstance(obj, Mapping):
            return self._mapping(obj, depth)
        if isinstance(obj, jax.core.Tracer):
            return {"type": "object", "name": _type_name(obj)}
        if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
            return _array(obj)
        if isinstance(obj, np.dtype):
            return {"type": "dtype", "name": str(obj)}
        if isinstance(obj, type):
            return {"type": "class", "name": _qualified(obj)}
        if isinstance(obj, types.ModuleType):
            return {"type": "module", "name": obj.__name__}
        if isinstance(obj, types.FunctionType):
            return self._function(obj, depth)
        if isinstance(obj, functools.partial):
            return {
                "type": "partial",
                "function": describe(obj.func),
                "args": [describe(a) for a in obj.args],
                "keywords": self._mapping(obj.keywords, depth),
            }
        if isinstance(obj, types.MethodType):
            return {
                "type": "method",
                "function": describe(obj.__func__),
                "self": describe(obj.__self__),
            }
        if dataclasses.is_dataclass(obj):
            fields = {f.name: describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            return {"type": "dataclass", "name": _qualified(type(obj)), "fields": fields}
        if callable(obj):
            out = {"type": "callable", "name": _callable_name(obj) or _type_name(obj)}
            wrapped = getattr(obj, "__wrapped__", None)  # jax.jit, functools.wraps
            if wrapped is not None:
                out["wrapped"] = describe(wrapped)
            return out
        return {"type": "object", "name": _type_name(obj)}

    def _mapping(self, obj: Any, depth: int) -> Any:
        if all(isinstance(k, str) for k in obj) and "type" not in obj:
            return {k: self.describe(obj[k], depth) for k in sorted(obj)}
        items = [[self.describe(k, depth), self.describe(v, depth)] for k, v in obj.items()]
        return {"type": "dict", "items": sorted(items, key=lambda kv: _canonical(kv[0]))}

    def _function(self, fn: types.FunctionType, depth: int) -> dict:
        code = fn.__code__
        out: dict[str, Any] = {"type": "function", "name": f"{fn.__module__}.{fn.__qualname__}"}
        closure = {}
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # a variable of the enclosing scope not yet assigned
                closure[name] = {"type": "empty_cell"}
            else:
                closure[name] = self.describe(value, depth)
        positional = code.co_varnames[: code.co_argcount]
        values = fn.__defaults__ or ()
        defaults = {
            name: self.describe(value, depth)
            for name, value in zip(positional[len(positional) - len(values) :], values)
        }
        kwdefaults = {
            k: self.describe(v, depth) for k, v in sorted((fn.__kwdefaults__ or {}).items())
        }
        # Floats only: which ints a compiler keeps as constants varies between Python
        # versions, while a float constant in code is a hyperparameter written inline.
        floats = {repr(c): c for c in code.co_consts if type(c) is float}
        constants = [_float(c) for c in sorted(floats.values(), key=_float_order)]
        for section, value in (
            ("closure", closure),
            ("defaults", defaults),
            ("kwdefaults", kwdefaults),
            ("constants", constants),
        ):
            if value:
                out[section] = value
        return out


class _NotSimple:
    pass


_NOT_SIMPLE = _NotSimple()


def _simple(obj: Any) -> Any:
    """The description of a scalar, or ``_NOT_SIMPLE``."""
    if obj is None:
        return None
    if isinstance(obj, enum.Enum):  # before int and str: IntEnum and StrEnum are both
        return {"type": "enum", "name": _qualified(type(obj)), "member": obj.name}
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):  # np.float64 too: a float64 hyperparameter is that float
        return _float(float(obj))
    if isinstance(obj, complex):
        return {"type": "complex", "real": _float(obj.real), "imag": _float(obj.imag)}
    if isinstance(obj, (bytes, bytearray)):
        return {"type": "bytes", "length": len(obj), "crc32": zlib.crc32(obj)}
    return _NOT_SIMPLE


def _float(x: float) -> Any:
    return x if math.isfinite(x) else {"type": "float", "value": repr(x)}


def _float_order(x: float) -> tuple:
    return (math.isnan(x), 0.0 if math.isnan(x) else x, repr(x))


def _array(obj: Any) -> dict:
    """Shape and dtype; a CRC-32 and small arrays' values where the bytes are at hand."""
    out: dict[str, Any] = {"type": "array", "shape": [int(d) for d in np.shape(obj)]}
    out["dtype"] = str(obj.dtype)
    data = obj
    if jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(obj)
    if isinstance(data, jax.Array) and not data.is_fully_addressable:
        return out  # split over processes: no one process can read it
    if data.size * data.dtype.itemsize > _CHECKSUM_BYTES:
        return out
    host = np.asarray(jax.device_get(data))
    if host.dtype.hasobject:
        return out
    out["crc32"] = _crc32(host)
    if host.size <= _ARRAY_VALUES:
        flat = host.reshape(-1)
        if jnp.issubdtype(host.dtype, jnp.floating):  # bfloat16 too, which NumPy lacks
            flat = flat.astype(np.float64)
        if jnp.issubdtype(flat.dtype, jnp.floating) or flat.dtype.kind in "biu":
            out["value"] = [_float(v) if isinstance(v, float) else v for v in flat.tolist()]
    return out


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _type_name(obj: Any) -> str:
    return _qualified(type(obj))


def _callable_name(obj: Any) -> str | None:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(name, str):
        return None
    return f"{module}.{name}" if isinstance(module, str) else name


def _canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _json_crc(node: Any) -> int:
    return zlib.crc32(_canonical(node).encode())


def _deduplicate(tree: Any) -> Any:
    """``tree`` with each repeat of an earlier subtree replaced by a ``same_as`` marker.

    A marker points relatively (``up`` levels, then down ``path``), so a fingerprint
    placed inside a larger dict still resolves. Only where the marker is shorter
    than the subtree. Builds new containers: the walker's memo shares one
    description object between places.
    """
    seen: dict[str, list] = {}

    def visit(node: Any, path: list) -> Any:
        if not isinstance(node, (dict, list)):
            return node
        text = _canonical(node)
        if text in seen:
            first = seen[text]
            common = 0
            while common < min(len(first), len(path)) and first[common] == path[common]:
                common += 1
            marker = {"type": "same_as", "up": len(path) - common, "path": first[common:]}
            if len(_canonical(marker)) < len(text):
                return marker
        else:
            seen[text] = list(path)
        if isinstance(node, dict):
            return {k: visit(v, path + [k]) for k, v in node.items()}
        return [visit(v, path + [i]) for i, v in enumerate(node)]

    return visit(tree, [])


# Comparing.


_ABSENT = object()


def differences(
    old: Any,
    new: Any,
    *,
    old_label: str = "in the checkpoint",
    new_label: str = "now",
) -> list[str]:
    """Lines saying where two fingerprints differ; empty when they are equal.

    Each line is ``path: old value <old_label>, new value <new_label>``. The path
    reads as the objects were built: function names (``chain``, ``scale``,
    ``clip_by_global_norm``; wrappers that only hold one transformation are left
    out), ``[i]`` for the i-th item of a list such as the transformations of a
    chain, and the names of closure variables, arguments, fields and dict keys. The
    keys of a top-level dict come first, before a colon:

        optimizer: chain[1] > scale > step_size: -0.001 in the checkpoint, -0.01 now

    One line per path: the first difference found there (an optax ``update`` is
    compared before its ``init``, since the hyperparameters live there).

    Args:
      old, new: two results of :func:`fingerprint` or :func:`data_fingerprint`, or
        dicts of them, as written and read back as JSON.
      old_label, new_label: what to call each side.
    """
    lines: dict[str, str] = {}
    root_old, root_new = _expand(old), _expand(new)
    _compare(root_old, root_new, [(None, root_old, "root")], lines, (old_label, new_label))
    return list(lines.values())


def _kind(node: Any) -> str | None:
    if isinstance(node, dict) and node.get("type") in _KINDS:
        return node["type"]
    return None


def _expand(root: Any) -> Any:
    """``root`` with every ``same_as`` marker replaced by what it points to."""

    def expand(node: Any, ancestors: list, hops: int) -> Any:
        if _kind(node) == "same_as":
            found = _resolve(node, ancestors) if hops < _MAX_DEPTH else None
            return node if found is None else expand(found[0], found[1], hops + 1)
        if isinstance(node, dict):
            return {k: expand(v, ancestors + [node], hops) for k, v in node.items()}
        if isinstance(node, list):
            return [expand(v, ancestors + [node], hops) for v in node]
        return node

    return expand(root, [], 0)


def _resolve(marker: dict, ancestors: list) -> tuple[Any, list] | None:
    """The subtree a ``same_as`` marker points to and its ancestors, or None."""
    up, path = marker.get("up"), marker.get("path")
    if not isinstance(up, int) or not 0 < up <= len(ancestors) or not isinstance(path, list):
        return None
    chain = ancestors[: len(ancestors) - up + 1]
    node = chain.pop()
    try:
        for part in path:
            chain.append(node)
            node = node[part]
    except (KeyError, IndexError, TypeError):
        return None
    return node, chain


def _compare(a: Any, b: Any, steps: list, lines: dict, labels: tuple) -> None:
    """Adds a line for each place under ``steps`` where ``a`` and ``b`` differ.

    ``steps`` is the path so far: ``(label, node, how)`` with ``how`` one of
    ``"root"``, ``"key"`` (a dict key someone chose), ``"name"`` (a closure
    variable, argument or field) and ``"index"``.
    """
    if a == b:
        return
    kind = _kind(a)
    if a is _ABSENT or b is _ABSENT or kind != _kind(b):
        _report(a, b, steps, lines, labels)
        return
    if kind is None:
        if isinstance(a, dict) and isinstance(b, dict):
            _compare_mappings(a, b, steps, lines, labels, how="key")
        elif isinstance(a, list) and isinstance(b, list) and _itemwise(a, b):
            for i, (x, y) in enumerate(zip(a, b)):
                _compare(x, y, steps + [(i, x, "index")], lines, labels)
        else:
            _report(a, b, steps, lines, labels)
        return
    if a.get("name") != b.get("name") or kind not in _STRUCTURED:
        _report(a, b, steps, lines, labels)
        return
    for section, how in _STRUCTURED[kind]:
        x, y = a.get(section, {}), b.get(section, {})
        if how == "self":
            _compare(x, y, steps + [(None, x, "name")], lines, labels)
        elif isinstance(x, dict) and isinstance(y, dict) and how in ("name", "key"):
            _compare_mappings(x, y, steps, lines, labels, how=how)
        else:
            _compare(x, y, steps + [(section, x, "name")], lines, labels)


# Which parts of a structured node are compared part by part, and how their labels read.
_STRUCTURED = {
    "function": [
        ("closure", "name"),
        ("defaults", "name"),
        ("kwdefaults", "name"),
        ("constants", "list"),
    ],
    "namedtuple": [("fields", "name")],
    "dataclass": [("fields", "name")],
    "partial": [("function", "self"), ("args", "list"), ("keywords", "key")],
    "method": [("function", "self"), ("self", "list")],
    "callable": [("wrapped", "self")],
}


def _compare_mappings(a: dict, b: dict, steps: list, lines: dict, labels: tuple, how: str) -> None:
    keys = list(a) + [k for k in b if k not in a]
    if "update" in keys and how == "name":
        keys.remove("update")
        keys.insert(0, "update")
    for k in keys:
        x, y = a.get(k, _ABSENT), b.get(k, _ABSENT)
        _compare(x, y, steps + [(k, x if x is not _ABSENT else y, how)], lines, labels)


def _report(a: Any, b: Any, steps: list, lines: dict, labels: tuple) -> None:
    path = _render(steps)
    if path not in lines:
        said = f"{_show(a)} {labels[0]}, {_show(b)} {labels[1]}"
        lines[path] = f"{path}: {said}" if path else said


def _render(steps: list) -> str:
    """The readable path of ``steps`` (see ``differences``)."""
    prefix = None
    segments: list[str] = []
    for i, (label, node, how) in enumerate(steps):
        last = i == len(steps) - 1
        if how == "key" and i == 1 and _kind(steps[0][1]) is None:  # a top-level dict's key
            prefix = str(label)
        elif how == "index":
            if segments:
                segments[-1] += f"[{label}]"
            else:
                segments.append(f"[{label}]")
        elif how == "key" or (how == "name" and label is not None and not _names_itself(node)):
            segments.append(str(label))
        if not last and _kind(node) == "function" and not _is_wrapper(node):
            segments.append(_short(node["name"]))
    rest = " > ".join(segments)
    if prefix is None:
        return rest
    return f"{prefix}: {rest}" if rest else prefix


def _itemwise(a: list, b: list) -> bool:
    """Whether two lists are compared item by item, rather than shown whole.

    Whole when their lengths differ, or when both are a few plain values (a shape
    reads better as ``[100, 3]`` than as its first item).
    """
    short = all(
        len(x) <= _ARRAY_VALUES and not any(isinstance(v, (dict, list)) for v in x) for x in (a, b)
    )
    return len(a) == len(b) and not short


def _names_itself(node: Any) -> bool:
    """Whether ``node`` is a function or transformation, whose name the path shows."""
    kind = _kind(node)
    if kind in ("function", "partial", "method", "callable"):
        return True
    if kind == "namedtuple":
        fields = node.get("fields", {}).values()
        return bool(fields) and all(_names_itself(f) for f in fields)
    if isinstance(node, list):
        return bool(node) and all(_names_itself(x) for x in node)
    return False


def _is_wrapper(node: dict) -> bool:
    """A function whose closure holds one transformation or function and nothing else."""
    closure = list(node.get("closure", {}).values())
    return len(closure) == 1 and not isinstance(closure[0], list) and _names_itself(closure[0])


def _short(name: str) -> str:
    """``optax._src.transform.scale.<locals>.update_fn`` -> ``scale`` (its factory)."""
    return name.split(".<locals>.")[0].rsplit(".", 1)[-1]


def _show(node: Any) -> str:
    """``node`` in a few words, for a line of ``differences``."""
    text = _show_full(node)
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 3] + "..."


def _show_full(node: Any) -> str:
    if node is _ABSENT:
        return "absent"
    kind = _kind(node)
    if kind is None:
        if isinstance(node, dict):
            return "{" + ", ".join(f"{k}: {_show_full(v)}" for k, v in node.items()) + "}"
        if isinstance(node, list):
            return "[" + ", ".join(_show_full(x) for x in node) + "]"
        return repr(node)
    if kind == "function":
        if _is_wrapper(node):  # with_extra_args_support: show what it wraps
            return _show_full(next(iter(node["closure"].values())))
        return _short(node["name"])
    if kind == "namedtuple" and _names_itself(node):
        fields = node["fields"]
        return _show_full(fields.get("update", next(iter(fields.values()))))
    if kind in ("namedtuple", "dataclass"):
        inner = ", ".join(f"{k}={_show_full(v)}" for k, v in node.get("fields", {}).items())
        return f"{_short(node['name'])}({inner})"
    if kind == "array":
        described = f"{node.get('dtype')}[{','.join(str(d) for d in node.get('shape', []))}]"
        if "value" in node:
            return f"{described} {_show_full(node['value'])}"
        if "crc32" in node:
            return f"{described} (CRC32 {node['crc32']})"
        return described
    if kind in ("partial", "method"):
        return f"{kind} of {_show_full(node.get('function'))}"
    if kind == "callable":
        return _short(node.get("name", "?"))
    if kind in ("class", "module", "dtype"):
        return f"{kind} {node.get('name')}"
    if kind == "enum":
        return f"{_short(node.get('name', '?'))}.{node.get('member')}"
    if kind == "float":
        return node.get("value", "?")
    if kind == "complex":
        return repr(complex(node.get("real", 0.0), node.get("imag", 0.0)))
    if kind in ("bytes", "sequence"):
        count = f"{node.get('length')} {'bytes' if kind == 'bytes' else 'items'}"
        return f"{count} (CRC32 {node.get('crc32')})"
    if kind == "set":
        return "{" + ", ".join(_show_full(x) for x in node.get("items", [])) + "}"
    if kind == "dict":
        pairs = node.get("items", [])
        return "{" + ", ".join(f"{_show_full(k)}: {_show_full(v)}" for k, v in pairs) + "}"
    if kind == "object":
        return f"a {node.get('name')} object"
    if kind in ("cycle", "truncated"):
        return f"<{kind}: {node.get('name')}>"
    return f"<{kind}>"
