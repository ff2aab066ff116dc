"""``python -m aligner_export`` = ``aligner-export``."""

import sys

from aligner_export.commands.cli import main

sys.exit(main())
