import sys

from archiver.cli import main

sys.exit(main())
