"""Metrics of predictions: numpy in, dict out (no torch, no files).

metrics (binary: threshold and ranking metrics, threshold rules' thresholds, the console
table), bootstrap (intervals that resample patients, for both tasks), threshold_rules (the
rule names, stdlib only: the CLI reads them at start-up), three_class (normal / bacterial /
viral metrics). Kept empty here so that importing threshold_rules stays cheap.
"""
