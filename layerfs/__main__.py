"""``python -m layerfs``: the command line."""
import sys

from layerfs.cli.main import main

sys.exit(main())
