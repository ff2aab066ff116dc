"""Build-time side of InferAligner Edge: calibrate, export, build, evaluate, inspect (CLI ``aligner-export``).

Heavy imports (torch, transformers, optimum) happen inside the commands that need them, as Polygraphy does: so that
``aligner-export --help`` answers at once, and so that a device install without the ``export`` extra gets one line
naming it instead of a traceback (docs/architecture.md §2).
"""

from aligner_runtime import __version__

__all__ = ["__version__"]
