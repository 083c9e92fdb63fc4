"""``python -m datainf`` (and ``torchrun -m datainf``): the ``datainf`` command."""

import sys

from .cli import main

sys.exit(main())
