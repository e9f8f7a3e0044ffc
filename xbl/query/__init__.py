"""Queries: which training images go to the annotator.

sampling    per-image strategies (entropy, margin, ...) over the training pool
clustering  clusters of explanations, and one answer carried to a cluster's members
"""
