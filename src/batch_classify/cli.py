"""``batch-classify``: run | demo | aggregate | compare | verify."""

from __future__ import annotations

import argparse
import sys

USAGE = """batch-classify <command> [options]

commands:
  run        run a job in this process (use `accelerate launch jobs/classify.py` for many)
  demo       classify scikit-image's sample photos with real EfficientNet-Lite0 weights
  aggregate  recompute metrics.json from an output folder's Parquet files
  compare    compare two output folders item by item (top-1 agreement, per-class differences)
  verify     check an output folder against its manifest: every id exactly once
"""


def _demo(argv: list[str]) -> int:
    from .demo import run_demo

    parser = argparse.ArgumentParser(prog="batch-classify demo",
                                     description="Run the embedded default job.")
    parser.add_argument("--output.dir", dest="output_dir", default="outputs/demo",
                        help="where the demo writes (default: outputs/demo)")
    args, extra = parser.parse_known_args(argv)
    return run_demo(args.output_dir, extra)


def _aggregate(argv: list[str]) -> int:
    from .aggregate import AggregateError, aggregate, format_table

    parser = argparse.ArgumentParser(prog="batch-classify aggregate",
                                     description="Recompute metrics.json from the Parquet files.")
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    try:
        metrics = aggregate(args.output_dir)
    except AggregateError as error:
        print(f"batch-classify aggregate: {error}", file=sys.stderr)
        return 1
    print(format_table(metrics))
    return 0


def _compare(argv: list[str]) -> int:
    from .compare import CompareError, compare, format_comparison

    parser = argparse.ArgumentParser(prog="batch-classify compare",
                                     description="Compare two output folders, joined on id.")
    parser.add_argument("dir_a")
    parser.add_argument("dir_b")
    args = parser.parse_args(argv)
    try:
        result = compare(args.dir_a, args.dir_b)
    except CompareError as error:
        print(f"batch-classify compare: {error}", file=sys.stderr)
        return 1
    print(format_comparison(result))
    return 0


def _verify(argv: list[str]) -> int:
    from .verify import verify

    parser = argparse.ArgumentParser(prog="batch-classify verify",
                                     description="Check an output folder against its manifest.")
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    try:
        result = verify(args.output_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"batch-classify verify: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.complete else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from .job import main as run_main

        return run_main(rest)
    if command == "demo":
        return _demo(rest)
    if command == "aggregate":
        return _aggregate(rest)
    if command == "compare":
        return _compare(rest)
    if command == "verify":
        return _verify(rest)
    print(f"batch-classify: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
