"""The batch contract between the data pipeline and the training step, and the clip conditioning constants that
training and sampling share."""

from __future__ import annotations

FPS_ID = 9
"""fps conditioning value (10 fps - 1), as in every Vista training clip."""
MOTION_BUCKET_ID = 127
"""Motion-bucket conditioning value, as in every Vista training clip."""
