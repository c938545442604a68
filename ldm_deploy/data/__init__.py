"""Procedural image-caption data (coloured shapes) for training and evaluating tiny models."""
