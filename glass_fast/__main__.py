"""``python -m glass_fast`` runs the ``glass-fast`` command line."""
import sys

from .cli import main

sys.exit(main())
