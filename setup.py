"""Build step the pyproject table cannot say: ship `specs/` (example sites, register maps, the
demo site, price samples) inside the package as `cem/specs`, so an installed `cem demo`,
`cem init` and `cem run --config` find them (`cem.app.packaged.specs_folder`). Everything else
is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SPECS = Path(__file__).resolve().parent / "specs"


class BuildWithSpecs(build_py):
    """build_py, plus a copy of specs/ into the built package (not for editable installs:
    those find specs/ beside the package)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False) or not SPECS.is_dir():
            return
        target = Path(self.build_lib) / "cem" / "specs"
        shutil.copytree(SPECS, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.db", "*.db-*"))


setup(cmdclass={"build_py": BuildWithSpecs})
