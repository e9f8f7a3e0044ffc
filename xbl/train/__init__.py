"""Training: models and the one way to train them.

models       the classifiers (small_cnn, ResNets) and their weights
fit          `fit`, the one entry point, for one process or N
loop         the training loop it runs, with or without feedback
retrain      retraining with feedback as a round runs it
distributed  data-parallel runs under torchrun
checkpoint   weights with what rebuilds the model
runtime      device, seeds, mixed precision
"""
