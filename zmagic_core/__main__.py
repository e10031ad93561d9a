"""`python -m zmagic_core ...` is the `zmagic` command (what launchers such as accelerate run)."""
import sys

from zmagic_core.app.cli import main

sys.exit(main())
