"""``batch-classify``: run | demo | aggregate | compare | verify."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from batch_classify.core.errors import UserError
from batch_classify.core.faults import output_fault

USAGE = """batch-classify <command> [options]

commands:
  run        run a job in this process (use `accelerate launch jobs/classify.py` for many)
  plan       list the input into units and say what a job would do (no model loaded)
  bench      measure images/s: model alone, input pipeline, the job, and two baselines
  demo       classify scikit-image's sample photos with real EfficientNet-Lite0 weights
  aggregate  recompute metrics.json from an output folder's Parquet files
  compare    compare two output folders item by item (top-1 agreement, per-class differences)
  verify     check an output folder against its manifest: every id exactly once
"""


def _demo(argv: list[str]) -> int:
    from batch_classify.commands.demo import run_demo

    parser = argparse.ArgumentParser(prog="batch-classify demo",
                                     description="Run the embedded default job.")
    parser.add_argument("--output.dir", dest="output_dir", default="outputs/demo",
                        help="where the demo writes (default: outputs/demo)")
    args, extra = parser.parse_known_args(argv)
    return run_demo(args.output_dir, extra)


@dataclass
class FolderCommand:
    """A command over output folders: parses them, runs ``action``, prints its text or a clear
    error (``error_status`` for the ``errors`` it expects)."""

    name: str
    description: str
    folders: list[str]
    action: Callable[..., tuple[str, int]]
    errors: tuple[type[Exception], ...]
    error_status: int = 1
    writes: bool = False
    """Whether the command writes into the folder (aggregate: metrics.json and the report)."""

    def __call__(self, argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog=f"batch-classify {self.name}", description=self.description)
        for folder in self.folders:
            parser.add_argument(folder)
        parser.add_argument("--storage_options", metavar="JSON_OR_YAML", default=None,
                            help="for an output folder given as a URL: the options of its store's "
                                 "client, as the job's output.storage_options (default: "
                                 "$BATCH_CLASSIFY_STORAGE_OPTIONS)")
        parser.add_argument("--data.storage_options", dest="data_storage_options", metavar="JSON_OR_YAML",
                            default=None, help="for an input in a store (the report's pictures, verify "
                                               "--recount): as the job's data.storage_options (default: "
                                               "--storage_options where the input's scheme is the output's)")
        args = parser.parse_args(argv)
        from batch_classify.core.secrets import redact_logs, redact_text
        from batch_classify.output.remote import OPTIONS_VARIABLE

        redact_logs()
        folders: list[str] = []
        try:  # an output in a store is read into its staging folder; the store is never written
            options = storage_options(args.storage_options, "--storage_options", OPTIONS_VARIABLE)
            data_options = storage_options(args.data_storage_options, "--data.storage_options")
            urls = [getattr(args, folder) for folder in self.folders]
            for url in urls:
                folders.append(_staged(url, options, data_options))
            text, status = self.action(*folders)
        except self.errors as error:
            print(f"batch-classify {self.name}: {redact_text(str(error))}", file=sys.stderr)
            return self.error_status
        except UserError as error:  # a store's mistake (missing bucket, no access): one line
            print(f"batch-classify {self.name}: {redact_text(str(error))}", file=sys.stderr)
            return 2
        except OSError as error:  # the folder's filesystem failed (full, read-only): one line
            fault = output_fault(error, folders[0] if folders else getattr(args, self.folders[0]))
            if fault is None:
                raise
            print(f"batch-classify {self.name}: {redact_text(fault.line())}", file=sys.stderr)
            return fault.exit_status
        print(text)
        for url, folder in zip(urls, folders):
            if url != folder and self.writes:
                print(f"batch-classify {self.name}: {redact_text(url)} was read into {folder}; what this "
                      "command writes is there, the store is left as it is", file=sys.stderr)
        return status


def _staged(url: str, options: dict | None, data_options: dict | None) -> str:
    """The folder to read for ``url`` (core.storage.side_mistake: a store's refusal in one line)."""
    from batch_classify.core.storage import side_mistake
    from batch_classify.output.remote import staged

    try:
        return staged(url, options, data_options)
    except OSError as error:
        mistake = side_mistake(error, {"output.dir": url})
        if mistake is None:
            raise
        raise mistake from None


class OptionsError(UserError, ValueError):
    """--storage_options that are not a JSON or YAML mapping."""


def storage_options(text: str | None, what: str, variable: str | None = None) -> dict | None:
    """Options given as JSON or YAML (or, where not given, in the environment variable)."""
    import os

    import yaml

    if text is None and variable is not None:
        text, what = os.environ.get(variable) or None, f"${variable}"
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)  # YAML reads JSON too
    except yaml.YAMLError as error:
        raise OptionsError(f"{what}: not JSON or YAML ({type(error).__name__}; give a mapping such as "
                           "'{endpoint_url: http://host:9000}')") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise OptionsError(f"{what}: a mapping of options is needed (e.g. '{{endpoint_url: "
                           f"http://host:9000}}'), not a {type(value).__name__}")
    return value


def _aggregate(argv: list[str]) -> int:
    from batch_classify.results.aggregate import AggregateError, aggregate, format_table

    return FolderCommand("aggregate", "Recompute metrics.json from the Parquet files.", ["output_dir"],
                         lambda folder: (format_table(aggregate(folder)), 0), (AggregateError, UserError),
                         error_status=2, writes=True)(argv)


def _compare(argv: list[str]) -> int:
    from batch_classify.results.compare import CompareError, compare, format_comparison

    return FolderCommand("compare", "Compare two output folders, joined on id.", ["dir_a", "dir_b"],
                         lambda a, b: (format_comparison(compare(a, b)), 0), (CompareError, UserError))(argv)


def _verify(argv: list[str]) -> int:
    from batch_classify.results.verify import VerifyError, verify

    recount = "--recount" in argv
    argv = [a for a in argv if a != "--recount"]

    def check(folder: str) -> tuple[str, int]:
        result = verify(folder, recount=recount)
        return result.summary(), 0 if result.complete else 1

    return FolderCommand("verify", "Check an output folder against its listing, unit by unit "
                         "(--recount: enumerate the input again and compare every unit's ids).",
                         ["output_dir"], check, (VerifyError, OSError, ValueError), error_status=2)(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from batch_classify.run.job import main as run_main

        return run_main(rest)
    if command == "plan":
        from batch_classify.run.plan import main as plan_main

        return plan_main(rest)
    if command == "bench":
        from batch_classify.bench.stages import main as bench_main

        return bench_main(rest)
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
