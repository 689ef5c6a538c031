"""Evaluation logic: task files, result tables and plots, loss curves."""
