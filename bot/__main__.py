"""`python -m bot` is the `threadbot` command."""

import sys

from bot.cli import main

sys.exit(main())
