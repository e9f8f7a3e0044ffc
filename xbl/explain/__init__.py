"""Explanations: saliency maps, their grid cells, explanation metrics and the PNGs shown."""
