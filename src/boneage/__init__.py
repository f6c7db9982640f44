"""Pediatric bone age assessment from left-hand radiographs."""

import os

# albumentations asks the network for updates at import; this toolkit must run offline and quietly.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.2.0"
