"""``python -m kiln.cli``: the same as the ``kiln`` console script."""

from kiln.cli import main

main()
