"""Reaching a Ray cluster and submitting jobs (issue #3; not built yet)."""
