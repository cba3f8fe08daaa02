"""Evaluation of world models: FID / FVD with a written protocol (docs/evaluation.md), the action-following
score, the sharded resumable evaluation run behind `evaluate.py`, and the in-training evaluation callback."""
