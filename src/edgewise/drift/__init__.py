"""Drift statistics (to be written)."""

__all__: list[str] = []
