"""pytest's root configuration: what `--doctest-modules` collects under `app/`.

Where the default model runs compiled (``app.models.compiled``), its modules are extension
modules that pytest cannot collect doctests from: their doctests run on the Python source in
``tests/test_compiled.py`` instead.
"""

from app.models import COMPILED
from app.models.compiled import MODULES

collect_ignore = [f"app/models/{name}.py" for name in MODULES] if COMPILED else []
