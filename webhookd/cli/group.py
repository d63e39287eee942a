"""The ``webhookd`` click group, which each verb's module registers its command on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from webhookd import __version__
from webhookd.cli.text import as_typed


class _Group(click.Group):
    """click's errors (an unknown verb or option, a bad value) show an argument's bytes that
    are not UTF-8 as typed, as the verbs' own errors do."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _as_typed():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _as_typed():
            return super().invoke(ctx)


@contextlib.contextmanager
def _as_typed() -> Iterator[None]:
    try:
        yield
    except click.ClickException as exc:
        # click holds its message Final; it is read only when shown, after this.
        setattr(exc, "message", as_typed(exc.message))  # noqa: B010
        raise


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
