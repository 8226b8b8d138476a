import sys

from blendrag.cli import main

sys.exit(main())
