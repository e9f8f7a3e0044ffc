"""Judging models: the evidence reviewers compare, and who becomes champion.

evaluate   a model's figures on every split
metrics    classification metrics
evidence   the shortcut-free images a candidate is judged on: audit or counterfactual
paired     the paired test (McNemar) and interval of candidate against champion
promotion  the candidate against the champion
"""
