"""Imports follow the data flow: every module imports only from layers below its own.

``LAYERS`` lists the layers bottom first. A module may import only from a lower layer (an
earlier line), never from its own layer or a higher one: so the receiver and the admin API never
import each other, no action kind imports another (they share ``actions/base.py`` and
``actions/delivery.py``, a layer lower), and nothing imports the app but the CLI. Imports under
``if TYPE_CHECKING:`` and inside functions count too.

A new module goes in the layer it belongs to (a ``pkg.*`` entry takes new modules of ``pkg``);
a module that others of its layer share moves to a layer of its own just below them.
"""

from __future__ import annotations

import ast
import shutil
from fnmatch import fnmatchcase
from pathlib import Path

# Read as source, never imported here: the check runs whatever state the imports are in.
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "webhookd"

LAYERS: tuple[tuple[str, ...], ...] = (
    # Nothing from webhookd, and the foundations' own.
    ("webhookd.forms", "webhookd.hangups", "webhookd.threads"),
    # Foundations: nothing from webhookd but the above.
    (
        "webhookd.errors",
        "webhookd.clock",
        "webhookd.models",
        "webhookd.state",
        "webhookd.content_coding",
        "webhookd.json_errors",
        "webhookd.throttle",
        "webhookd.sdnotify",
    ),
    # The receiver's HTTP/1.1 server: requests and answers, then connections and the listener.
    ("webhookd.http1.wire",),
    ("webhookd.http1.server",),
    ("webhookd", "webhookd.secret", "webhookd.templates", "webhookd.http1"),
    # Signature schemes: the shared parts, one module per scheme, the registry.
    ("webhookd.schemes.base",),
    ("webhookd.schemes.*",),
    ("webhookd.schemes",),
    # Config: single values' checks and reading secrets and files, the Table, the values and
    # types it fills, the reload plan, the parser, the package that gathers them.
    ("webhookd.config.checks", "webhookd.config.reading"),
    ("webhookd.config.table",),
    ("webhookd.config.values",),
    ("webhookd.config.sections",),
    ("webhookd.config.reloads",),
    ("webhookd.config.parsing",),
    ("webhookd.config",),
    ("webhookd.redact", "webhookd.send"),
    ("webhookd.logs", "webhookd.alert_texts"),
    # The journal: a file's identity and its rescue (nothing of webhookd), who holds a SQLite
    # file and the threads its connections run on (nothing of the journal), what it takes and
    # gives and its SQL, its parts, the two journals, the package that picks one.
    ("webhookd.journal.moved", "webhookd.journal.locks", "webhookd.journal.threads"),
    ("webhookd.journal.records",),
    ("webhookd.journal.schema",),
    # A SQLite journal's file and what lies beside it, as the reads and the copies judge it.
    ("webhookd.journal.files",),
    # The interface and the SQLite group commit's writes, which PostgreSQL's writer reuses.
    ("webhookd.journal.base", "webhookd.journal.batch"),
    ("webhookd.journal.postgres.db",),
    # The SQLite journal's group-commit writer, under the rest of its parts.
    ("webhookd.journal.writer",),
    (
        "webhookd.journal.*",
        "webhookd.journal.postgres.reads",
        "webhookd.journal.postgres.schema",
        "webhookd.journal.postgres.writes",
    ),
    ("webhookd.journal.postgres.nodes",),
    ("webhookd.journal.postgres.changes",),
    ("webhookd.journal.postgres", "webhookd.journal.sqlite"),
    ("webhookd.journal",),
    # Copies of a SQLite journal (backup, restore; into PostgreSQL), under the daemon's lock.
    ("webhookd.journal.copies", "webhookd.journal.postgres.from_sqlite"),
    # Over the journal's interface, or pacing the work.
    ("webhookd.retention", "webhookd.scheduler", "webhookd.limiter", "webhookd.pauses"),
    # Actions: the interface, the HTTP client, their targets as configured, the delivery helpers,
    # one module per kind, the registry.
    ("webhookd.actions.base",),
    ("webhookd.actions.client",),
    ("webhookd.actions.targets",),
    ("webhookd.actions.delivery",),
    # The openai action's settings and what a provider says of its limits.
    ("webhookd.actions.openai_config", "webhookd.actions.openai_limits"),
    ("webhookd.actions.*",),
    ("webhookd.actions",),
    # The worker pool's parts: one attempt of a job, the jobs left to other nodes, what runs
    # and whether one more may start, what a drain does with the jobs it cuts off, the hold
    # of new jobs while the receiver answers a burst, each attempt's log line.
    (
        "webhookd.attempts",
        "webhookd.elsewhere",
        "webhookd.admission",
        "webhookd.draining",
        "webhookd.hold",
        "webhookd.joblines",
    ),
    # The worker pool, and the one alert posted directly with the alerts' forward action.
    ("webhookd.workers", "webhookd.alert_journal"),
    # What the receiver reads from a request, and its pacing; what the daemon counts.
    ("webhookd.receiver.reading", "webhookd.receiver.limits", "webhookd.stats"),
    # The daemon's faces, side by side: none imports another.
    ("webhookd.receiver.handler", "webhookd.admin", "webhookd.metrics", "webhookd.alerts"),
    ("webhookd.receiver",),
    # The daemon's process, its status line, what it reads of its journal as it starts.
    ("webhookd.process", "webhookd.status", "webhookd.boot"),
    # A config reload, which the daemon runs.
    ("webhookd.reloading",),
    ("webhookd.app",),
    # The CLI: its leaves (times and text, the click group, the admin API's client), what every
    # verb shares, the bulk verbs' batches, one module per family of verbs, the package.
    ("webhookd.cli.text",),
    ("webhookd.cli.group", "webhookd.cli.daemon"),
    ("webhookd.cli.base",),
    ("webhookd.cli.batches",),
    ("webhookd.cli.*",),
    ("webhookd.cli",),
    ("webhookd.entry",),
    ("webhookd.__main__",),
)


def modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> int | None:
    """The line of ``LAYERS`` that ``module`` is on: its exact name wins over a ``pkg.*``."""
    wildcard = None
    for line, patterns in enumerate(LAYERS):
        for pattern in patterns:
            if pattern == module:
                return line
            if pattern.endswith(".*") and fnmatchcase(module, pattern):
                wildcard = line
    return wildcard


def imports(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line number, module) for every webhookd module that ``module`` imports."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # ``from webhookd import actions`` imports a module; ``from webhookd import
                # __version__`` a name of the package.
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return [(lineno, name) for lineno, name in found if name.split(".")[0] == "webhookd"]


def violations(package_dir: Path) -> list[str]:
    """One line per import that does not point down ``LAYERS``, and per module not in it."""
    found = modules(package_dir)
    problems = [
        f"{name} is on no line of LAYERS: add it to its layer"
        for name in found
        if layer_of(name) is None
    ]
    for name, path in found.items():
        mine = layer_of(name)
        if mine is None:
            continue
        where = path.relative_to(package_dir.parent)
        for lineno, target in imports(name, path, set(found)):
            theirs = layer_of(target)
            if theirs is None or target == name or theirs < mine:
                continue
            side = "the same layer" if theirs == mine else "a higher layer"
            problems.append(
                f"{where}:{lineno}: {name} imports {target}, which is in {side} of LAYERS "
                f"({', '.join(LAYERS[theirs])}): imports must point down the layers"
            )
    return problems


def test_every_import_points_down_the_layers() -> None:
    """No module imports one beside or above it: receiver and admin stay apart, actions apart,
    and nothing reaches up into the app or the CLI."""
    problems = violations(PACKAGE_DIR)
    assert not problems, "\n".join(problems)


def test_every_line_of_the_layers_names_real_modules() -> None:
    """The table stays true to the package: each entry matches at least one module."""
    names = modules(PACKAGE_DIR)
    stale = [
        pattern
        for patterns in LAYERS
        for pattern in patterns
        if not any(name == pattern or fnmatchcase(name, pattern) for name in names)
    ]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package with ``line`` appended to ``module``'s file."""
    copy = tmp_path / "webhookd"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy.joinpath(*module.split(".")[1:]).with_suffix(".py")
    target.write_text(target.read_text("utf-8") + f"\n{line}\n", "utf-8")
    return copy


def _added(copy: Path) -> list[str]:
    """The problems the copy has that the package itself has not."""
    return sorted(set(violations(copy)) - set(violations(PACKAGE_DIR)))


def test_an_upward_import_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    """Adding ``from webhookd.app import Daemon`` to models.py fails the check, naming both."""
    copy = _copy_with(tmp_path, "webhookd.models", "from webhookd.app import Daemon")
    lineno = len((copy / "models.py").read_text("utf-8").splitlines())
    [problem] = _added(copy)
    assert problem.startswith(f"webhookd/models.py:{lineno}: webhookd.models imports webhookd.app")


def test_a_sideways_import_between_receiver_and_admin_is_refused(tmp_path: Path) -> None:
    """The admin API importing the receiver (as it once did for IntakeState) fails the check."""
    copy = _copy_with(tmp_path, "webhookd.admin", "from webhookd.receiver import handler")
    [problem] = _added(copy)
    assert "webhookd.admin imports webhookd.receiver.handler, which is in the same layer" in problem


def test_an_action_importing_another_action_is_refused(tmp_path: Path) -> None:
    """One action kind importing another fails the check (a relative import included)."""
    copy = _copy_with(tmp_path, "webhookd.actions.forward", "from . import openai")
    [problem] = _added(copy)
    assert "webhookd.actions.forward imports webhookd.actions.openai" in problem
