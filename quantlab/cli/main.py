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
import pkgutil
import sys
from typing import List, Optional

from quantlab.errors import QuantlabError



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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        module = importlib.import_module(f"quantlab.cli.{name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (QuantlabError, FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        if args.verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"quantlab {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"quantlab {args.command}: interrupted", file=sys.stderr)
        return 130
