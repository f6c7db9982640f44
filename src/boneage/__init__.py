"""Pediatric bone age assessment from left-hand radiographs."""

__version__ = "0.1.0"
