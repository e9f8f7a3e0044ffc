"""Judging models: evaluation, metrics and promotion."""
