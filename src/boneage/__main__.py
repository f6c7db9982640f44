"""``python -m boneage``: the same as the ``boneage`` command."""

import sys

from boneage.cli import main

sys.exit(main())
