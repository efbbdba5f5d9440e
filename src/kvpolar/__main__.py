import sys

from kvpolar.cli import main

sys.exit(main())
