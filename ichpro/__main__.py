"""``python -m ichpro`` runs the command line."""

import sys

from ichpro.cli import main

sys.exit(main())
