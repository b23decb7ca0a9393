"""The ``quantlab`` command line. Each sub-command lives in its own module.

Every module of ``quantlab.cli`` that defines ``register(subparsers)`` is a
sub-command: ``register`` adds its parser and sets ``func`` (called with the
parsed args; returns an exit code). Modules import heavy dependencies inside
``func`` so ``quantlab --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from typing import List, Optional

from quantlab.cli._progress import configure as configure_progress
from quantlab.cli.common import add_quiet_arg
from quantlab.errors import QuantlabError
from quantlab.interrupts import Terminated, terminate_as_interrupt


def command_modules() -> List[str]:
    """Names of the sub-command modules, sorted."""
    import quantlab.cli as package

    return sorted(
        name
        for _, name, is_pkg in pkgutil.iter_modules(package.__path__)
        if not is_pkg and name not in ("main", "common") and not name.startswith("_")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlab", description="INT8 quantization workbench for PyTorch models")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--debug", action="store_true", help="full tracebacks for errors (without debug logging)")
    add_quiet_arg(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        module = importlib.import_module(f"quantlab.cli.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    for command in sub.choices.values():  # `quantlab demo --quiet` as well as `quantlab --quiet demo`
        if not any("--quiet" in action.option_strings for action in command._actions):
            add_quiet_arg(command)
    return parser


#: Errors that are the user's input (a file, a value, a path), reported as one line.
USER_ERRORS = (QuantlabError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               ValueError, KeyError, ImportError, ConnectionError)


def _one_line(exc: BaseException) -> str:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = str(message).strip()
    return text if text else type(exc).__name__


def _quiet_stdout() -> None:
    """stdout's reader went away (``quantlab runs | head``): send the rest nowhere, no traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_progress(quiet=args.quiet, command=args.command)
    tracebacks = args.verbose or args.debug
    prefix = f"quantlab {args.command}"
    try:
        with terminate_as_interrupt():
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return code
    except BrokenPipeError:
        _quiet_stdout()
        return 141 if argv is None else 1
    except Terminated as exc:
        print(f"{prefix}: {exc.args[0]}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if tracebacks:
            raise
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug (ours or a library's): one line and how to see more
        if tracebacks:
            raise
        detail = " ".join(_one_line(exc).split())[:1000]
        print(f"{prefix}: internal error: {type(exc).__name__}: {detail} (run again with --debug for the traceback)", file=sys.stderr)
        return 70  # EX_SOFTWARE
