"""``python -m headscope``: the ``headscope`` command, as torchrun starts it (``torchrun ... -m headscope score ...``)."""

from headscope.cli import main
from headscope.distributed import exit_process

exit_process(main())
