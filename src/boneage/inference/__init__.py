"""Inference without Catalyst: predictor, evaluation, reports helpers."""
