"""Print pip constraints pinning each of webhookd's dependencies to the oldest version
pyproject.toml allows (``name>=X`` becomes ``name==X``)."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    spec = requirement.split(";")[0]
    match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", spec)
    if match is None:
        raise SystemExit(f"floors: {requirement!r} has no plain >= floor")
    print(f"{match[1]}=={match[2]}")
