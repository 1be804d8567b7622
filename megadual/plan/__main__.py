"""python -m megadual.plan (megadual/plan/cli.py)."""
import sys

from megadual.plan.cli import main

sys.exit(main())
