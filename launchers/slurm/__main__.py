import sys

from .helper import main

sys.exit(main())
