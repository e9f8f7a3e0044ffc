"""Feedback: what annotators said, and how retraining learns from it.

losses    the explanation penalties (RRR, RRR-G, HINT, eXBL triplet)
methods   one class per feedback method, in one registry
schedule  the annotated images a retraining draws, and λ with its step weight
masks     each round's feedback manifest and masks under data/feedback/
cost      what a round cost the annotators
"""
