"""What alerts say: an error quoted safely for a chat, a count by source, a duration."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from webhookd.redact import printable

SOURCES_IN_TEXT = 5  # sources (or actions) named in one alert; "…" for the rest
ERROR_IN_TEXT = 200


def cut(text: str, most: int = ERROR_IN_TEXT) -> str:
    """An error for the text: a sender's or a target's words, quoted and not obeyed. One
    printable line (a line break shows as ``\\n``), cut, then with ``&``, ``<`` and ``>``
    escaped as Slack asks (``&amp;`` ``&lt;`` ``&gt;``; Mattermost shows them as the
    characters): ``<!channel>`` or ``<https://…|Open the runbook>`` in an error would
    otherwise mention everyone, or show a link under a label of the sender's choosing."""
    text = printable(text)
    text = text if len(text) <= most else text[: most - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sources(counts: Counter[str], paused: Collection[str] = ()) -> str:
    """``shop: 4 paused, github: 1`` for the biggest few sources, ``…`` for the rest."""
    top = counts.most_common(SOURCES_IN_TEXT)
    text = ", ".join(f"{name}: {n}{' paused' if name in paused else ''}" for name, n in top)
    return text + (", …" if len(counts) > SOURCES_IN_TEXT else "")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
