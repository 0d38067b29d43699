"""Inference helpers (sliding window) and evaluator wiring."""
