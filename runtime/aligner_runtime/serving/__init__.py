"""Serving many clients from one loaded export (issue 13).

- :mod:`.scheduler`: continuous batching. One thread drives the backend; requests join the running batch at
  decode-step boundaries and leave when done, each row with its own gate (docs/architecture.md §5).
- :mod:`.requests`: what a client may ask for (chat messages, sampling values), checked into one clear error.
- :mod:`.http`: the OpenAI-compatible endpoint of ``aligner-serve`` (Starlette + uvicorn, the ``serve`` extra).
- :mod:`.cli`: ``aligner-serve``.

The Triton Inference Server model (``aligner-export triton``) runs the same scheduler.
"""

from .scheduler import Event, QueueFull, RequestHandle, Scheduler

__all__ = ["Event", "QueueFull", "RequestHandle", "Scheduler"]
