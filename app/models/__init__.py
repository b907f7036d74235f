"""Per-sensor models: the Protocol every model implements and the built-in models.

The default model's modules run compiled where ``app.models.compiled`` built them for the
current sources; the import below decides it, before any module of this package is loaded.
"""

from app.models.compiled import enable

COMPILED = enable(__path__)
"""Whether ``ridge`` and ``alarms`` are imported from their compiled build."""

from app.models.base import (  # noqa: E402 - after the path is set
    ModelOptions,
    Observation,
    SensorModel,
    SensorModelClass,
    load_model_class,
)

__all__ = [
    "COMPILED",
    "ModelOptions",
    "Observation",
    "SensorModel",
    "SensorModelClass",
    "load_model_class",
]
