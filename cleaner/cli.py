"""`model-storage-cleaner`: the one front; each command is a module of cleaner.commands, registered here.

Every command exits with a code of shared.exit_codes; every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from cleaner.commands import audit, plan, run, trash
from cleaner.policies import validate
from shared.config import load_settings
from shared.errors import FILESYSTEM_ERRNOS, StorageError, error_line, unplaced_filesystem_error
from shared.exit_codes import ExitCode
from shared.logs import configure_logging

PROG = "model-storage-cleaner"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line and exit code 2 instead of argparse's usage block.
        print(f"{PROG}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(ExitCode.CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Decide and apply evictions for a model store, from Prometheus data.")
    parser.add_argument("--config", metavar="FILE", help="YAML settings file (or STORAGE_CONFIG)")
    parser.add_argument("--actor", metavar="NAME", default="cli", help="who runs this, for the audit log")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    plan.register(subparsers)
    run.register(subparsers)
    trash.register(subparsers)
    audit.register(subparsers)
    return parser


def _fail(message: str) -> None:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


def _fail_with(err: StorageError, as_json: bool) -> int:
    """The line for people; under `--json` also the JSON error line the exporter reads (shared.errors)."""
    _fail(err.one_line())
    if as_json:
        print(error_line(err), file=sys.stderr)
    return err.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    debug = False
    as_json = False
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        as_json = bool(getattr(args, "json", False))
        if getattr(args, "func", None) is None:
            parser.error("a command is required")
        settings = load_settings(args.config)
        validate(settings.cleaner)
        debug = settings.log.level == "debug"
        configure_logging(settings.log.format, settings.log.level)
        code: int = args.func(settings, args)
        return code
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else ExitCode.CONFIG
    except StorageError as err:
        return _fail_with(err, as_json)
    except KeyboardInterrupt:
        _fail("interrupted")
        return ExitCode.INTERRUPTED
    except OSError as err:
        if err.errno not in FILESYSTEM_ERRNOS:
            if debug:
                traceback.print_exc()
            _fail(f"unexpected error: {type(err).__name__}: {err}")
            return ExitCode.UNEXPECTED
        return _fail_with(unplaced_filesystem_error(err), as_json)
    except Exception as err:
        if debug:
            traceback.print_exc()
        _fail(f"unexpected error: {type(err).__name__}: {err}")
        return ExitCode.UNEXPECTED
