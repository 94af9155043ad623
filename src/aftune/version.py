"""aftune's version, committed in every run config (`versions.aftune`)."""

__version__ = "0.1.0"
