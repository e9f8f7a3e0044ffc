"""Feedback: what annotators said, and how retraining learns from it.

losses    the explanation penalties (RRR, RRR-G, HINT, eXBL triplet)
methods   one class per feedback method, in one registry
schedule  the annotated images a retraining draws, and λ with its step weight
masks     each round's masks under data/feedback/, joined to the images by image ID
cost      what a round cost the annotators
counterfactual  a marked region replaced by content that carries no label
"""
