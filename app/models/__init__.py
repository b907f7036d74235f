"""Per-sensor models: the Protocol every model implements and the built-in models."""

from app.models.base import (
    ModelOptions,
    Observation,
    SensorModel,
    SensorModelClass,
    load_model_class,
)

__all__ = ["ModelOptions", "Observation", "SensorModel", "SensorModelClass", "load_model_class"]
