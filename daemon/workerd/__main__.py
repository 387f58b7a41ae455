import sys

from workerd.cli import main

sys.exit(main())
