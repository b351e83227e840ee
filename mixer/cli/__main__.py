"""`python -m mixer.cli ...` is `mixer ...`."""

import sys

from mixer.cli import main

sys.exit(main())
