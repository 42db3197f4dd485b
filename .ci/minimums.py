"""Print `name==lower bound` for every runtime dependency in pyproject.toml (the user-facing extras included, the
`dev` tools not) except torch and torchvision, which CI pins. .ci/run installs these as constraints next to the pinned
torch and runs the quick tests, to prove that each declared lower bound works."""

import re
import sys
from pathlib import Path

import tomllib

PINNED_ELSEWHERE = {"torch", "torchvision"}
project = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
requirements = list(project["dependencies"])
for name, extra in project.get("optional-dependencies", {}).items():
    if name != "dev":
        requirements += extra
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", requirement.split(";")[0].strip())
    if match is None:
        sys.exit(f"{requirement!r}: every dependency needs a plain lower bound 'name>=version'")
    if match.group(1).lower() not in PINNED_ELSEWHERE:
        print(f"{match.group(1)}=={match.group(2)}")
