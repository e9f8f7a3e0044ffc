"""Label Studio as pure data (no network; services/labelstudio.py talks to the server).

interface  the labeling interfaces and the names of their parts
payloads   what the loop sends: tasks, heat maps, pre-drawn cells
results    what comes back: annotations and verdicts read into masks
oracle     the simulated annotator and reviewer, perfect or imperfect
agreement  several annotators on one task: their agreement and the conflict rule
"""
