"""The ``webhookd`` command. Before the CLI is imported (0.2 s), a SIGHUP to ``serve`` is only
noted (``webhookd.hangups``), not the end of the process."""

from __future__ import annotations

import signal
import sys

from webhookd import hangups


def main() -> None:
    if sys.argv[1:2] == ["serve"]:  # the verb, not any argument (events --source serve)
        signal.signal(signal.SIGHUP, hangups.note)
    from webhookd.cli import main as cli

    cli()
