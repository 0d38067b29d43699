"""Datasets, split tool, dual-stream mappers, CutMix and the two-stream loader."""
