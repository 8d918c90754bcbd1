"""What the subcommands of ``akidb-embed`` share: the exit codes, the parser class whose usage
errors are one line, and the host client built from the common options."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "Parser", "open_client"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as every other error of the command
    (the subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def open_client(args: argparse.Namespace) -> Any:
    """The ``EmbeddingClient`` the common options describe (a context manager)."""
    from akidb_embed.host_client import EmbeddingClient

    return EmbeddingClient(
        args.model_dir,
        provider=args.provider,
        workers=args.workers,
        threads=args.threads,
        lanes=args.lanes,
    )
