"""``python -m headscope``: the ``headscope`` command, as torchrun starts it (``torchrun ... -m headscope score ...``)."""

import sys

from headscope.cli import main

sys.exit(main())
