"""``send``: sign a test webhook as a source's provider would, and post it."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from webhookd.cli.base import CONFIG_HELP, _fail, _read_config
from webhookd.cli.group import main
from webhookd.errors import ConfigError
from webhookd.redact import printable


@main.command()
@click.argument("source")
@click.option(
    "--file",
    "body_file",
    type=click.File("rb"),
    help="Body to send ('-' for stdin; default: a small test payload).",
)
@click.option("--url", help="Where to post (default: server.listen and the source's path).")
@click.option(
    "--id",
    "delivery_id",
    help="Delivery id (default: a fresh one; reuse it to test dedup). Where the signed body is"
    " a dedup key too (verify.dedup_body), the same --file is a duplicate under any id; and"
    " Stripe and Slack read the id from the body, so beside --file a note says it is not sent.",
)
@click.option(
    "--header",
    "-H",
    "extra_headers",
    multiple=True,
    metavar="'NAME: VALUE'",
    help="A header to send besides the provider's (repeatable), e.g. -H 'X-GitHub-Event: push'"
    " to try a when filter; one the provider sets is replaced (a warning says if the"
    " request then does not verify).",
)
@click.option(
    "--cacert",
    type=click.Path(exists=True, dir_okay=False),
    help="For an https --url: trust the CA certificates in this PEM file instead of the"
    " system's (a proxy in front of the daemon with a private CA's certificate).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def send(
    source: str,
    body_file: Any,
    url: str | None,
    delivery_id: str | None,
    extra_headers: tuple[str, ...],
    cacert: str | None,
    config_path: str | None,
) -> None:
    """Sign a test webhook the way SOURCE's provider would and post it; print the answer.

    Exits 0 on a 2xx answer, 1 on any other answer or a network failure, 2 on a usage or
    config error (naming the option or key: an unknown source, a secret not set).
    """
    import secrets

    from webhookd import send as send_mod

    # Only SOURCE's secret is needed: another source's (or the admin token's) variable may be
    # unset where a developer tries one provider. A missing one of SOURCE's is named on use.
    cfg = _read_config(config_path)
    try:
        extra = [send_mod.parse_header(h) for h in extra_headers]
        tls = send_mod.trusting(cacert) if cacert is not None else None
        src = send_mod.resolve(cfg, source)
        if note := send_mod.catch_all_note(cfg, source, src):
            click.echo(f"webhookd: note: {note}", err=True)
        now = time.time()
        delivery = send_mod.build(
            src,
            url=url or send_mod.source_url(cfg, source),
            body=body_file.read() if body_file is not None else None,
            now=now,
            delivery_id=delivery_id or "test_" + secrets.token_hex(8),
            extra_headers=extra,
        )
        if warning := send_mod.unverified_note(src, delivery, extra, now):
            click.echo(f"webhookd: warning: {warning}", err=True)
        if body_file and delivery_id and (note := send_mod.id_note(src, delivery, delivery_id)):
            click.echo(f"webhookd: note: {note}", err=True)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        answer = send_mod.post(delivery, tls=tls)
    except send_mod.PostError as exc:  # refused, timed out, or a URL urllib cannot use
        shown = send_mod.shown_url(delivery.url)  # a --url's password never printed
        if not exc.unreachable:
            _fail(f"could not post to {shown}: {exc}", 1)
        where = "--url" if url else f"server.listen in {cfg.origin}"
        hint = f": is the daemon running? ({where})" if exc.refused else ""
        _fail(f"cannot reach {shown}: {exc}{hint}", 1)
    # What the answering server chose, escaped: none of it reaches the terminal as a control.
    click.echo(printable(f"{answer.status} {answer.reason}"))
    if answer.location is not None:
        click.echo(printable(f"redirect to {answer.location} not followed"))
    if answer.body:
        text = answer.body.decode("utf-8", "replace")
        click.echo("\n".join(printable(line) for line in text.split("\n")))
    if answer.status == 401 and (note := send_mod.refused_note(cfg, src)):
        click.echo(f"webhookd: note: {note}", err=True)
    sys.exit(0 if answer.ok else 1)
