"""Build-time side of InferAligner Edge: calibrate, export, build, evaluate, inspect (CLI ``aligner-export``).

Heavy imports (torch, transformers, optimum) happen inside the commands that need them, so that
``aligner-export --help`` answers at once (see ../shared/STYLE.md, Polygraphy's lazy imports).
"""

from aligner_runtime import __version__

__all__ = ["__version__"]
