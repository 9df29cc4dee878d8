"""The function Ray Train ships to its controller and workers for the sft and sfo jobs (``pipelines.train.run``).

The controller unpickles it too, which imports its module: ``pipelines.train`` imports DeepSpeed's, diffusers'
and the model's code, ~3 s of a fresh process for every job, where the controller needs none of it. This
module imports nothing, and the loop is imported where it runs, on each worker.
"""

from __future__ import annotations


def train_loop(loop_config: dict) -> None:
    """``pipelines.train.train_loop``, imported on the worker that runs it."""
    from pipelines.train import train_loop as loop

    loop(loop_config)
