"""Feedback: the explanation losses and methods, the retraining schedule, the masks and their cost."""
