"""Prefect flows that compose the tasks, and the command line."""

from services import offline as _offline  # noqa: F401
