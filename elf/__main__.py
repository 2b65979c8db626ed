"""``python -m elf``: the ``elf`` command line (:func:`elf.cli.main`) run as a module."""

import sys

from .cli import main

sys.exit(main())
