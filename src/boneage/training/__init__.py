"""Training: the Catalyst runner and its callbacks."""
