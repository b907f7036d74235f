"""Benchmarks: run them all with ``sensorcast bench`` (see ``bench/_common.py``)."""
