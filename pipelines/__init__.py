"""Ray jobs: each runs as ``python -m pipelines.<job>`` locally or under ``ray job submit``."""
