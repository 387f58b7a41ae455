"""`python -m workerd`: the daemon.

Runs in: the master.
"""

import sys

from workerd.cli import main

sys.exit(main())
