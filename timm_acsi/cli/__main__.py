"""``python -m timm_acsi.cli COMMAND ...``, the same as the ``timm-acsi`` console command."""

import sys

from . import main

sys.exit(main())
