"""Asking a running daemon over its admin API: its ``/stats``, a pause or resume applied."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from webhookd import config as config_mod


async def _daemon_stats(
    cfg: config_mod.Config, journal_id: str
) -> tuple[dict[str, Any] | None, str | None]:
    """The running daemon's ``/stats`` (workers, lanes, throughput), else None and why not:
    not asked (no admin listener on a known port), not reachable, refused (a 401: the token,
    named by its variable, never by its value), another answer, or a daemon of another journal
    (``journal_id``: this one's, ``BaseJournal.identity``) on that port."""
    import aiohttp

    listen = cfg.admin.listen
    if listen is None:
        return None, "no admin API to ask (admin.listen is off)"
    if listen.port == 0:
        return None, "no admin API to ask (admin.listen has port 0: its port is not known)"
    address, headers = _admin_address(cfg)
    sent = bool(headers)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
            http.get(f"http://{address}/stats", headers=headers) as r,
        ):
            if r.status == 401:
                return None, _refused(cfg, sent)
            if r.status != 200:
                return None, f"the admin API at {address} answered {r.status}"
            doc: dict[str, Any] = await r.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None, f"not reachable on the admin API at {address}"
    # A daemon of an earlier webhookd says nothing of its journal: taken at its word.
    if doc.get("journal_id", journal_id) != journal_id:
        return None, (
            f"the daemon answering on the admin API at {address} serves another journal"
            f" (admin.listen in {cfg.origin} is another config's?)"
        )
    return doc, None


async def _daemon_applies(
    cfg: config_mod.Config, journal_id: str, source: str, pausing: bool
) -> tuple[bool, str | None]:
    """Whether the daemon of this journal, asked on its admin API, applied a pause or resume
    the journal already holds (answered once its dispatcher has it); if not, why, when a
    daemon answered (a refused token, another journal's daemon on the port)."""
    import aiohttp

    daemon, why = await _daemon_stats(cfg, journal_id)
    if daemon is None:
        quiet = why is None or why.startswith(("no admin API", "not reachable"))
        return False, None if quiet else why
    address, headers = _admin_address(cfg)
    verb = "pause" if pausing else "resume"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.post(
                f"http://{address}/sources/{quote(source, safe='')}/{verb}",
                headers={**headers, "X-Webhookd": "1"},
            ) as r,
        ):
            return r.status == 200, None if r.status == 200 else f"it answered {r.status}"
    except (aiohttp.ClientError, TimeoutError):
        return False, None


def _admin_address(cfg: config_mod.Config) -> tuple[str, dict[str, str]]:
    """Where the CLI reaches the daemon's admin API (``admin.listen``, a wildcard as loopback),
    and the headers its token needs."""
    listen = cfg.admin.listen
    assert listen is not None
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else listen.host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    token = cfg.admin.token
    # An unset token variable sends no token: the answer still tells a daemon that is up (401)
    # from one that is not there.
    sent = token is not None and not token.missing
    headers = {"Authorization": f"Bearer {token.reveal()}"} if token and sent else {}
    return f"{host}:{listen.port}", headers


def _refused(cfg: config_mod.Config, sent: bool) -> str:
    """Why the admin API answered 401, naming admin.token's variable (never its value)."""
    token = cfg.admin.token
    if token is None:
        return f"the admin API wants a token, and admin.token is not set in {cfg.origin}"
    variable = token.variable
    if not sent:
        return (
            f"the admin API refused the request: admin.token is {token.reference},"
            f" which {'is not set' if variable else 'cannot be read'} here"
        )
    where = f"{variable} (admin.token)" if variable else "admin.token"
    return f"the admin API refused the token in {where}: not the daemon's"
