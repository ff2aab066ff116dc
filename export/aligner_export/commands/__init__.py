"""The ``aligner-export`` command line: one module per subcommand (``configure(parser)`` and ``run(args)``).

The top of the exporter: it may import every other wing; nothing imports it but ``tools``.
"""
