import sys

from gramopt.cli import main

sys.exit(main())
