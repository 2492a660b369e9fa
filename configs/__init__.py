"""Experiment configs: `default.py` plus one file per row of the paper table."""
