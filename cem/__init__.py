"""S2 Customer Energy Manager."""

__version__ = "0.1.0"
