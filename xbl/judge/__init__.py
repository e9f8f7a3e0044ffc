"""Judging models: the evidence reviewers compare, and who becomes champion.

evaluate   a model's figures on every split
metrics    classification metrics
promotion  the candidate against the champion
"""
