import sys

from gramopt.console import main

sys.exit(main())
