import sys

from imagewarm.cli import main

sys.exit(main())
