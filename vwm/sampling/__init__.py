"""Sampling runs (what `sample.py` does): options, model loading, clip sources, outputs, and the run loop.
`vwm.rollout` holds the rollout procedure itself."""
