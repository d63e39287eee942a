"""The ``webhookd`` click group, which each verb's module registers its command on."""

from __future__ import annotations

import click

from webhookd import __version__


def _version(ctx: click.Context) -> None:
    """The release, and the schema versions its journals are at once it has started on them:
    what an upgrade or a rollback is about (a journal newer than these is refused)."""
    from webhookd.journal.postgres.schema import MIGRATIONS as POSTGRES_MIGRATIONS
    from webhookd.journal.schema import MIGRATIONS as SQLITE_MIGRATIONS

    click.echo(
        f"webhookd {__version__} (journal schema: SQLite {len(SQLITE_MIGRATIONS)},"
        f" PostgreSQL {len(POSTGRES_MIGRATIONS)})"
    )
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: _version(ctx) if value else None,
    help="Show the version and the journal schema versions it reads, and exit.",
)
def main() -> None:
    """webhookd: receive webhooks durably, answer in milliseconds, work in the background."""
