"""sensorcast: live predictions on sensor streams."""

__version__ = "0.1.0"
