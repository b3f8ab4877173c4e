"""The type gate `make test` runs: mypy over the whole project, with two rules.

- The core packages (the layers under the edge: S2, control types, flex, planner, signals,
  control, site, store, ports, sitekit) have no mypy errors at all.
- The rest (the edge, the twin, the resource managers) has at most the number of errors in
  `[tool.cem.typecheck] ceiling` of pyproject.toml: it may only go down. Lower the ceiling when
  you fix some.

Exit code 1 with the errors that break a rule; 0 with a one-line summary otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cem", "resource_managers", "sitekit")
CORE = ("cem/s2/", "cem/control_types/", "cem/flex/", "cem/planner/", "cem/signals/",
        "cem/control/", "cem/site/", "cem/store.py", "cem/ports.py", "sitekit/")
ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):\d+: error: ")


def main() -> int:
    ceiling = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["cem"]["typecheck"][
        "ceiling"]
    run = subprocess.run([sys.executable, "-m", "mypy", *PACKAGES], cwd=ROOT,
                         capture_output=True, text=True)
    errors = [line for line in run.stdout.splitlines() if ERROR.match(line)]
    if run.returncode not in (0, 1) or (run.returncode == 1 and not errors):
        print(run.stdout, run.stderr, sep="\n")
        print("typecheck: mypy itself failed")
        return 1
    core = [e for e in errors if ERROR.match(e)["path"].startswith(CORE)]  # type: ignore[index]
    rest = len(errors) - len(core)
    if core:
        print("\n".join(core))
        print(f"typecheck: {len(core)} mypy error(s) in the core packages (must be 0)")
        return 1
    if rest > ceiling:
        print("\n".join(errors))
        print(f"typecheck: {rest} mypy error(s) outside the core packages, more than the "
              f"ceiling of {ceiling} in pyproject.toml [tool.cem.typecheck]")
        return 1
    print(f"typecheck: core packages clean; {rest} error(s) elsewhere (ceiling {ceiling})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
