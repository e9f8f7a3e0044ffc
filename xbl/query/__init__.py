"""Queries: which training images go to the annotator (sampling, clustering, propagation)."""
