"""Observation: what a run reports about itself (the stats plot)."""
