import sys

from lenvm.cli import main

sys.exit(main())
