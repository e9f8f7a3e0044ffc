"""Explanations: where a model looks, and how that is shown.

saliency  DeepLIFT against a blurred baseline, and the one differentiable GradCAM
cells     the grid over a map: top cells, and cells back to pixel masks
pool      saliency maps of many pool images, in batches
metrics   explanation metrics: wrong-reason share, activation recall
render    the PNGs annotators and reviewers see
"""
