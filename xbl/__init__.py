"""xbl: explanation-based human-in-the-loop learning against shortcut features."""

__version__ = "0.1.0"
