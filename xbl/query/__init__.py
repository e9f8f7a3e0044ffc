"""Queries: which training images go to the annotator.

sampling    per-image strategies (entropy, margin, ...) over the training pool
clustering  clusters of explanations, the cluster strategy's pick, and one answer carried to a
            cluster's members
round       a query round: choose the images, explain them, draw them
records     the round's queries as the annotator gets them: PNGs, queries.json's records
"""
