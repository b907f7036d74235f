"""The default model's hot path compiled to C with mypyc, beside its Python source.

``app/models/ridge.py`` and ``app/models/alarms.py`` are typed Python; mypyc (part of mypy,
the project's type checker) compiles them into C extension modules that score the same
readings to the same doubles for a fraction of the interpreter's cost (``bench/saturation.py``
runs the same load both ways). The Python source stays the one truth: the build puts the
extensions in ``app/models/_compiled/`` with a manifest of the sources' digest, and
``app.models`` takes them (by putting that folder first on its ``__path__``) only while the
digest still matches, so an edited source runs as Python until it is built again, never as a
stale extension.

``python -m app.models.build`` builds (``make`` does it after installing); the variable
``SENSORCAST_COMPILED_MODEL=0`` runs the Python source even where the build is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DIRECTORY = PACKAGE / "_compiled"
"""Where the build puts the extension modules and their manifest (not in version control)."""
MANIFEST = "manifest.json"
MODULES = ("alarms", "ridge")
"""The modules of ``app.models`` that are compiled."""
GROUP = "app.models._compiled"
"""mypyc's name for the modules' shared runtime library (``app.models._compiled__mypyc``)."""
SWITCH = "SENSORCAST_COMPILED_MODEL"


def digest(package: Path = PACKAGE) -> str:
    """What the compiled modules were built from: their sources and the interpreter's ABI."""
    h = hashlib.sha256(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    for name in MODULES:
        h.update(b"\0" + name.encode() + b"\0" + (package / f"{name}.py").read_bytes())
    return h.hexdigest()


def usable(directory: Path = DIRECTORY, package: Path = PACKAGE) -> bool:
    """Whether ``directory`` holds a build of the current sources for this interpreter."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return bool(manifest.get("digest") == digest(package))
    except (OSError, ValueError):
        return False


def enable(path: list[str]) -> bool:
    """Put the compiled modules first on the package ``path`` when they are usable and not
    switched off; called by ``app.models`` before any of its modules is imported."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not usable():
        return False
    if str(DIRECTORY) not in path:
        path.insert(0, str(DIRECTORY))
    return True


def active() -> bool:
    """Whether the default model runs compiled in this process."""
    from app.models import ridge

    return Path(ridge.__file__ or "").parent == DIRECTORY
