"""Print pip constraints pinning each of webhookd's dependencies to the oldest version
pyproject.toml allows (``name>=X`` becomes ``name==X``)."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    # A floor for some Pythons only (asyncpg's and uvloop's on 3.13) keeps its marker.
    spec, _, marker = requirement.partition(";")
    match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", spec)
    if match is None:
        raise SystemExit(f"floors: {requirement!r} has no plain >= floor")
    print(f"{match[1]}=={match[2]}" + (f"; {marker.strip()}" if marker else ""))
