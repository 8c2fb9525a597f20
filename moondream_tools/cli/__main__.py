"""``python -m moondream_tools.cli``: the ``moondream-tools`` command."""

from . import main

main()
