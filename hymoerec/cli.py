"""What the command-line tools share: a usage error is one line on stderr and exit code 2;
progress is drawn only on a terminal."""
from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (``prog: error: ...``) instead of the
    whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def fail(message: str, code: int = 2) -> SystemExit:
    """Print ``error: message`` on stderr; returns the SystemExit(code) to raise."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(code)


def interactive() -> bool:
    """Whether stdout and stderr are both terminals: where a progress bar's redraws (``\r``)
    show as one updating line rather than as thousands of lines in a log file."""
    return sys.stdout.isatty() and sys.stderr.isatty()
