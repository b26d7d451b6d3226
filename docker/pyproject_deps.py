#!/usr/bin/env python3
"""Print the requirement lines of pyproject.toml: [project].dependencies plus the named extras.

The Dockerfile installs these before it copies the source, so that editing the code does not
rebuild the dependency layers.
"""

from __future__ import annotations

import argparse
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    lines = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            known = ", ".join(sorted(optional)) or "none"
            raise ValueError(f"pyproject.toml has no extra {extra!r} (extras: {known})")
        lines += optional[extra]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pyproject", nargs="?", default="pyproject.toml")
    parser.add_argument("--extra", action="append", default=[], help="an extra (repeatable)")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        data = tomllib.load(f)
    try:
        print("\n".join(requirements(data, args.extra)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
