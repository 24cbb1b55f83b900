"""A checkpoint's record: the JSON that says what a step holds and lets it be rebuilt.

The record lives in ``<step>/metadata/metadata.json``, beside orbax's array item
``<step>/state``. It holds the caller's metadata, fnnet's own facts (format, step,
time, package versions, metrics), one spec entry per leaf (path, shape, dtype,
content digest, and the PRNG implementation of a key) and the tree's structure,
so a checkpoint restores without a target and without pickle. It carries a
checksum of itself: an edited record is a damaged step, never another model.

Reading a record trusts nothing on disk: only a regular file is opened, and
anything unreadable, malformed or inconsistent is a ``CorruptCheckpointError``
naming the file, which the store treats as a damaged step and falls back past.
"""

from __future__ import annotations

import collections
import datetime
import importlib.metadata
import json
import math
import pathlib
import stat
import sys
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnnet.train._checkpoint_errors import CheckpointMismatchError, CorruptCheckpointError

FORMAT = "fnnet-checkpoint-3"  # 3: sharded arrays, digests that ignore sharding
ARRAYS, RECORD_ITEM, RECORD_FILE = "state", "metadata", "metadata.json"
COMMIT_MARKER = "commit_success.txt"  # orbax's marker of a committed step
RESERVED = (
    "format", "step", "saved_at", "versions", "metrics", "spec", "structure", "record_crc32",
)  # fmt: skip
MAX_LISTED = 20


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in ("fnnet", "jax", "jaxlib", "orbax-checkpoint", "optax", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def new_record(step: int, metadata: Mapping[str, Any], metrics: Mapping | None) -> dict:
    """The record without the tree: the caller's metadata, versions and metrics."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of JSON-able values, got {type(metadata)}")
    clash = sorted(set(metadata) & set(RESERVED))
    if clash:
        raise ValueError(
            f"metadata may not use the keys {clash}: fnnet stores its own facts under "
            f"{list(RESERVED)}"
        )
    try:
        # A copy: the record is written in the background, while the caller's lists
        # (fit's history) go on growing.
        metadata = json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-able (numbers, strings, lists, dicts): {e}") from e
    clean = {}
    for name, value in (metrics or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {name!r} must be a number, got {value!r}") from None
        clean[str(name)] = number if math.isfinite(number) else None  # JSON has no NaN
    return {
        "format": FORMAT,
        "step": step,
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "metrics": clean,
        **metadata,
    }


def seal(record: dict) -> dict:
    return record | {"record_crc32": _record_crc32(record)}


def _record_crc32(record: dict) -> int:
    body = {k: v for k, v in record.items() if k != "record_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, allow_nan=False).encode())


# The tree: paths, leaves and structure.


def component(key: Any) -> str:
    """One step of a tree path as text: a dict key, a field name or an index."""
    for kind, field in (
        (jax.tree_util.DictKey, "key"), (jax.tree_util.GetAttrKey, "name"),
        (jax.tree_util.SequenceKey, "idx"), (jax.tree_util.FlattenedIndexKey, "key"),
    ):  # fmt: skip
        if isinstance(key, kind):
            return str(getattr(key, field))
    return str(key)


def path_str(keypath: tuple) -> str:
    return "/".join(component(k) for k in keypath)


def is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def describe(shape: Any, dtype: Any) -> str:
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def encode(step: int, state: Any) -> tuple[dict, list[tuple[str, Any]], list[dict], dict]:
    """Splits ``state`` into orbax's nested dict of arrays, the stored ``(path, array)``
    pairs, the spec (without digests) and the structure.

    JAX arrays stay where they are (orbax writes each process's shards); keys become
    their ``uint32`` key data; anything else becomes a NumPy array.
    """
    leaves: list[tuple[tuple[str, ...], Any]] = []
    structure = _structure(state, (), leaves)
    arrays: dict[str, Any] = {}
    stored, spec = [], []
    for comps, leaf in leaves:
        path = "/".join(comps)
        entry = {"path": path, "shape": list(np.shape(leaf))}
        if is_key(getattr(leaf, "dtype", None)):
            entry |= {"dtype": str(leaf.dtype), "prng_impl": str(jax.random.key_impl(leaf))}
            leaf = jax.random.key_data(leaf)
            entry["key_data_shape"] = list(leaf.shape)
        else:
            # A host leaf is copied: it is written in the background, after save returns.
            leaf = leaf if isinstance(leaf, jax.Array) else np.array(leaf)
            if not (jnp.issubdtype(leaf.dtype, jnp.number) or leaf.dtype == np.bool_):
                raise TypeError(
                    f"cannot save leaf {path!r} of step {step}: dtype {leaf.dtype} is not "
                    "numeric; a checkpoint holds arrays, scalars and PRNG keys"
                )
            entry["dtype"] = str(leaf.dtype)
        spec.append(entry)
        stored.append((path, leaf))
        if leaf.size == 0:  # orbax refuses empty arrays; the spec alone rebuilds them
            continue
        # Orbax names arrays by their '.'-joined path, so keys 1 and '1', or 'a.b'
        # beside a/b, would collide and one would silently overwrite the other.
        node = arrays
        for c in comps[:-1]:
            node = node.setdefault(c, {})
            if not isinstance(node, dict):
                break
        if not comps or not isinstance(node, dict) or comps[-1] in node:
            raise ValueError(
                f"cannot save the state of step {step}: the leaf path {path!r} is empty or "
                "collides with another once keys are written as text (keys 1 and '1', or "
                "keys containing '/' or '.')"
            )
        node[comps[-1]] = leaf
    if not arrays:
        raise ValueError(f"the state of step {step} holds no non-empty arrays to save")
    return arrays, stored, spec, structure


def _structure(node: Any, comps: tuple[str, ...], leaves: list) -> dict:
    """The JSON description of ``node``'s tree; appends ``(path components, leaf)``."""
    if node is None:
        return {"type": "none"}
    treedef = jax.tree_util.tree_structure(node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        leaves.append((comps, node))
        return {"type": "leaf"}
    # One level of the tree: every child counts as a leaf except ``node`` itself.
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    names = [component(kp[0]) for kp, _ in children]
    described = [_structure(c, comps + (n,), leaves) for n, (_, c) in zip(names, children)]
    if isinstance(node, dict):
        keys = [kp[0].key for kp, _ in children]
        keys = [k if isinstance(k, (str, int)) else str(k) for k in keys]
        return {"type": "dict", "keys": keys, "children": described}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        cls = type(node)
        return {
            "type": "namedtuple", "module": cls.__module__, "name": cls.__qualname__,
            "fields": list(cls._fields), "children": described,
        }  # fmt: skip
    if type(node) in (list, tuple):
        return {"type": type(node).__name__, "children": described}
    return {"type": "node", "name": type(node).__qualname__, "keys": names, "children": described}


def build(structure: dict, values: dict[str, Any], comps: tuple[str, ...] = ()) -> Any:
    """Rebuilds a tree from its JSON description and ``{path: restored leaf}``.

    NamedTuples come back as their class when its module is already imported, else
    as a look-alike; other pytree nodes as dicts. Restoring never imports a module
    named by a file on disk.
    """
    kind = structure["type"]
    if kind == "none":
        return None
    if kind == "leaf":
        return values["/".join(comps)]
    names = {
        "dict": lambda: [str(k) for k in structure["keys"]],
        "namedtuple": lambda: structure["fields"],
        "node": lambda: structure["keys"],
    }.get(kind, lambda: [str(i) for i in range(len(structure["children"]))])()
    children = [build(c, values, comps + (n,)) for n, c in zip(names, structure["children"])]
    if kind == "dict":
        return dict(zip(structure["keys"], children))
    if kind == "namedtuple":
        return _namedtuple_class(structure)(*children)
    if kind == "node":
        return dict(zip(names, children))
    return children if kind == "list" else tuple(children)


def _namedtuple_class(structure: dict) -> type:
    obj: Any = sys.modules.get(structure["module"])
    for part in structure["name"].split("."):
        obj = getattr(obj, part, None)
    fields = tuple(structure["fields"])
    if isinstance(obj, type) and issubclass(obj, tuple) and getattr(obj, "_fields", None) == fields:
        return obj
    return collections.namedtuple(structure["name"].rsplit(".", 1)[-1], fields)


# Reading a record back.


def read(step_dir: Any, step: int) -> dict:
    """The record of ``step`` in ``step_dir`` after the cheap checks; raises if damaged."""
    local = isinstance(step_dir, pathlib.Path)
    if (
        local
        and step_dir.is_symlink()
        and step_dir.parent.resolve() not in step_dir.resolve().parents
    ):
        raise CorruptCheckpointError(
            f"{step_dir} is a symbolic link out of the checkpoint directory (to "
            f"{step_dir.resolve()}); a step is read only from inside it"
        )
    if not (step_dir / COMMIT_MARKER).exists():
        raise CorruptCheckpointError(
            f"{step_dir} has no commit marker {COMMIT_MARKER}: the save never finished "
            "committing, or the directory was changed afterwards"
        )
    path = step_dir / RECORD_ITEM / RECORD_FILE
    try:
        # A FIFO would block the read forever, a link lead away: only regular files.
        if local and not stat.S_ISREG(path.lstat().st_mode):
            raise CorruptCheckpointError(f"the record {path} is not a regular file")
        text = path.read_text()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"the record {path} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"the record {path} cannot be read: {e}") from None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as e:  # bad JSON, 5000 digits, nesting too deep
        reason = str(e) or type(e).__name__
        raise CorruptCheckpointError(
            f"the record {path} is not readable JSON: {reason[:200]}"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CorruptCheckpointError(
            f"the record {path} is not an fnnet checkpoint record of format {FORMAT!r} "
            f"(found {found!r}); was it written by another version of fnnet?"
        )
    try:
        intact = record.get("record_crc32") == _record_crc32(record)
    except (TypeError, ValueError, RecursionError):
        intact = False
    if not intact:
        raise CorruptCheckpointError(
            f"the record {path} does not match its checksum: it was edited or damaged "
            "(the model it describes could no longer be trusted)"
        )
    if record.get("step") != step:
        raise CorruptCheckpointError(
            f"the record {path} is for step {record.get('step')!r}, not {step}: the "
            "directory was renamed or copied by hand"
        )
    return record


def check_target(record: dict, target: Any, step_dir: Any) -> None:
    """Raises CheckpointMismatchError listing every path where record and target differ."""
    saved = {e["path"]: (tuple(e["shape"]), e["dtype"]) for e in record["spec"]}
    wanted = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        if getattr(leaf, "dtype", None) is None or getattr(leaf, "shape", None) is None:
            leaf = np.asarray(leaf)
        wanted[path_str(kp)] = (tuple(leaf.shape), str(leaf.dtype))
    problems = [
        f"missing from the checkpoint: {p} ({describe(*w)})"
        for p, w in wanted.items()
        if p not in saved
    ]
    problems += [
        f"{p}: checkpoint has {describe(*saved[p])}, target wants {describe(*w)}"
        for p, w in wanted.items()
        if p in saved and saved[p] != w
    ]
    problems += [
        f"not in the target: {p} ({describe(*s)})" for p, s in saved.items() if p not in wanted
    ]
    if problems:
        listed = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            listed.append(f"... and {len(problems) - MAX_LISTED} more")
        lines = "".join(f"\n  {line}" for line in listed)
        raise CheckpointMismatchError(
            f"the checkpoint {step_dir} does not match the target ({len(problems)} "
            f"differences):{lines}\nWas the target built from a different model or "
            "optimizer configuration? The checkpoint's record says how it was made: "
            f"load_metadata({str(step_dir.parent)!r}, {record['step']}).",
            problems,
        )
