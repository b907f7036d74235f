"""Build the compiled default model: ``python -m app.models.build`` (see ``app.models.compiled``).

Needs mypy (the ``dev`` extra) and a C compiler; ``make`` runs it after installing, and the
Docker image's build stage runs it in the image.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from app.models.compiled import DIRECTORY, GROUP, MANIFEST, MODULES, PACKAGE, SWITCH, digest


def build(directory: Path = DIRECTORY, package: Path = PACKAGE) -> list[Path]:
    """Compile ``MODULES`` of ``package`` into ``directory`` (replacing what is there).

    Returns the extension modules written. Needs mypy and a C compiler.

    Raises:
        RuntimeError: mypy or the C compiler is missing or fails.
    """
    try:
        from mypyc.build import mypycify
        from setuptools import Distribution
        from setuptools.command.build_ext import build_ext
    except ImportError as exc:  # pragma: no cover - the dev extra brings mypy
        raise RuntimeError(f"building the compiled model needs mypy: {exc}") from exc
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        raise RuntimeError(
            "building the compiled model needs a C compiler (`apt-get install gcc`), "
            f"or run the Python source with {SWITCH}=0"
        )
    sources = [str(package / f"{name}.py") for name in MODULES]
    expected = digest(package)
    with tempfile.TemporaryDirectory(prefix="sensorcast-mypyc-") as scratch:
        work = Path(scratch)
        here = Path.cwd()
        try:
            # mypy reads its configuration from the working directory: build from the scratch
            # folder, with the options given here, not the project's (its plugins import
            # more than the model needs).
            os.chdir(work)
            extensions = mypycify(
                [*sources, "--ignore-missing-imports", "--follow-imports=silent"],
                group_name=GROUP,
                target_dir=str(work / "c"),
            )
            command = build_ext(Distribution({"ext_modules": extensions}))
            command.build_lib = str(work / "lib")
            command.build_temp = str(work / "temp")
            command.ensure_finalized()
            command.run()
        except SystemExit as exc:  # mypycify exits on a type error
            raise RuntimeError(f"mypyc could not compile the model: exit {exc.code}") from exc
        finally:
            os.chdir(here)
        built = sorted((work / "lib").rglob("*" + str(sysconfig.get_config_var("EXT_SUFFIX"))))
        if len(built) != len(MODULES) + 1:
            raise RuntimeError(f"mypyc built {[p.name for p in built]}, expected {MODULES}")
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        written = [Path(shutil.copy2(path, directory / path.name)) for path in built]
    (directory / MANIFEST).write_text(
        json.dumps({"digest": expected, "modules": [p.name for p in written]}, indent=1) + "\n"
    )
    return written


def main() -> int:
    try:
        build()
    except RuntimeError as exc:
        print(f"sensorcast: {exc}", file=sys.stderr)
        return 1
    print(f"sensorcast: compiled {', '.join(MODULES)} into {DIRECTORY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
