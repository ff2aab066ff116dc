"""Developer tools run with ``python -m``: the end-to-end demo (``make demo``), the steering sweep and the
calibration-corpus builder. The top wing: it may use the commands.
"""
