"""edgewise: an operating layer for fleets of edge AI devices."""

__version__ = "0.1.0"
__all__ = ["__version__"]
