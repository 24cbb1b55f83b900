"""``python -m experiments``: list, run and report the experiments."""

from __future__ import annotations

import argparse
import difflib
import pathlib
import sys

from experiments._config import ConfigError


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its commands' parsers. No parser accepts abbreviations: ``--seed 2``
    is an error that suggests ``--seeds``, never a guess at what was meant."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Train fnnet's architectures side by side and report what they do.",
        allow_abbrev=False,
    )
    # What chooses the runs, shared by run and report (report finds the runs' records).
    selection = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    selection.add_argument("items", nargs="*", metavar="NAME|FIELD=VALUE")
    selection.add_argument(
        "--seeds", type=int, help="seeds per model (replicas trained in one program)"
    )
    selection.add_argument("--quick", action="store_true", help="tiny settings, same code paths")
    selection.add_argument("--out", type=_folder, help="output folder (default results/)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "list", help="the experiments, their fields, and the model registry", allow_abbrev=False
    )
    run = commands.add_parser(
        "run",
        parents=[selection],
        help="run experiments: NAME... (or all) and FIELD=VALUE overrides",
        description="Run experiments. Arguments are experiment names (or all) and "
        "FIELD=VALUE overrides of their configuration, e.g. "
        "`python -m experiments run architectures steps=2000 models=mlp,cnn`.",
        allow_abbrev=False,
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--mesh",
        help="devices to train over, e.g. data=8 (default: every device found, on a "
        "'data' axis; one device trains as usual)",
    )
    run.add_argument(
        "--device",
        choices=("cpu", "gpu", "tpu"),
        help="require this backend: an error, never a silent CPU run, if it is absent",
    )
    run.add_argument(
        "--precision",
        choices=("default", "high", "highest"),
        help="float32 matmul precision (jax_default_matmul_precision; see docs/tpu.md)",
    )
    run.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="keep compiled programs in DIR and reuse them in later runs (JAX's "
        "persistent compilation cache; off by default)",
    )
    run.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host run first (jax.distributed.initialize; on a TPU slice it "
        "finds its peers itself, elsewhere give the three options below)",
    )
    run.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed: process 0")
    run.add_argument("--num-processes", type=int, help="with --distributed: how many take part")
    run.add_argument("--process-id", type=int, help="with --distributed: this one's index")
    run.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="where the runs' checkpoints go (default OUT/NAME/checkpoints): on several "
        "hosts a bucket (gs://..., with gcsfs) or a disk every host mounts",
    )
    run.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=30.0,
        help="checkpoint an unfinished run at most this often (0: every evaluation)",
    )
    commands.add_parser(
        "report",
        parents=[selection],
        help="rebuild summaries and plots from records",
        allow_abbrev=False,
    )
    return parser, dict(commands.choices)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments. Names and overrides after an option are still items (argparse
    alone leaves ``steps=50`` of ``run depth --quick steps=50`` unrecognized); an
    unknown option exits 2, naming the nearest known one."""
    parser, commands = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        command = commands[args.command]
        # argparse lists a parser's options only in its private _actions.
        known = [o for action in command._actions for o in action.option_strings]
        close = difflib.get_close_matches(unknown[0].partition("=")[0], known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        command.error(f"unrecognized option {unknown[0]}{hint}")
    if extra and not hasattr(args, "items"):
        parser.error(f"{args.command} takes no arguments, got {' '.join(extra)}")
    if extra:
        args.items = [*args.items, *extra]
    return args


def _folder(text: str) -> pathlib.Path:
    """``--out``: a file system path. A URL is refused (pathlib would make ``gs://b``
    a local folder ``gs:/b``); copy results to a bucket afterwards (docs/tpu.md)."""
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a URL; --out takes a folder on disk (copy it to a bucket afterwards; "
            "--checkpoints takes a bucket)"
        )
    return pathlib.Path(text)


def _split(items: list[str]) -> tuple[list[str], dict[str, str]]:
    names, overrides = [], {}
    for item in items:
        if "=" in item:
            field, _, value = item.partition("=")
            if not field:
                raise ConfigError(f"override {item!r} has no field name; write FIELD=VALUE")
            overrides[field] = value
        else:
            names.append(item)
    return names, overrides


def _mesh(spec: str | None):
    """The mesh for ``--mesh``; by default fit's ``"auto"``: a ``data`` axis over
    every device (one device trains without any sharding machinery)."""
    from fnnet import distributed

    if spec is None:
        return "auto"
    mesh = distributed.mesh_from_spec(spec)
    if "data" not in mesh.axis_names:
        raise ValueError(f"--mesh {spec}: the runner splits work over an axis named data")
    return mesh


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from experiments import _suite

    if args.command == "list":
        print(_suite.describe())
        return 0
    out = args.out or pathlib.Path("results/quick" if args.quick else "results")
    try:
        names, overrides = _split(args.items)
        if args.command == "report":
            lines = _suite.report(out, names, overrides, seeds=args.seeds, quick=args.quick)
        else:
            plans = _suite.plan(names, overrides, seeds=args.seeds, quick=args.quick)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "report":
        print("\n".join(lines))
        return 0
    from fnnet import distributed
    from fnnet.train import CheckpointDirectoryError

    try:
        peers = (args.coordinator, args.num_processes, args.process_id)
        if any(v is not None for v in peers) and not args.distributed:
            raise ValueError("--coordinator, --num-processes and --process-id need --distributed")
        if args.distributed:
            distributed.init_distributed(*peers)
        if args.device is not None:
            distributed.require_backend(args.device)
        if args.precision is not None:
            distributed.set_matmul_precision(args.precision)
        if args.compile_cache is not None:
            try:
                distributed.use_compilation_cache(args.compile_cache)
            except ValueError as e:
                raise ValueError(f"--compile-cache: {e}") from None
        mesh = _mesh(args.mesh)
        if args.checkpoints is not None:
            from fnnet.train._checkpoint import storage_path

            storage_path(args.checkpoints, "--checkpoints")  # a URL's package is named now
    except (distributed.BackendError, ValueError, TypeError, CheckpointDirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _suite.execute(
        plans,
        out,
        progress=not args.no_progress,
        checkpoint_seconds=args.checkpoint_seconds,
        mesh=mesh,
        checkpoints=args.checkpoints,
    )
    print(f"results: {out / 'README.md'}")
    for p in plans:
        print(f"  {out / p.experiment.name / 'summary.md'}")
    return 0
