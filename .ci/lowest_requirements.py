"""Print setup.cfg's requirements pinned to their lower bounds (`name>=X` -> `name==X`), for the oldest-versions CI run.

    python .ci/lowest_requirements.py test > lowest.txt   # install_requires + the `test` extra and what it includes

A requirement without a lower bound is an error: every dependency states the oldest release we test.
"""

import configparser
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirement_lines(extras: list[str]) -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].split("\n")
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in config["options.extras_require"][extra].split("\n"):
            included = re.fullmatch(r"%\((\w+)\)s", line.strip())
            if included:
                pending.append(included.group(1))
            else:
                lines.append(line)
    return [line.strip() for line in lines if line.strip()]


def pinned_to_lower_bound(line: str) -> str:
    """`name>=X[,<Y]` -> `name==X` (a plain regex: this runs before any virtualenv has `packaging`)."""
    name = re.match(r"[A-Za-z0-9_.-]+", line).group()
    lower = re.findall(r">=\s*([^,;\s]+)", line)
    if len(lower) != 1:
        raise SystemExit(f"setup.cfg: {line!r} needs exactly one lower bound (>=) to be tested at")
    return f"{name}=={lower[0]}"


if __name__ == "__main__":
    print("\n".join(pinned_to_lower_bound(line) for line in requirement_lines(sys.argv[1:])))
