"""``python -m filedispatch``: the same as the ``filedispatch`` command."""

from .cli import main

raise SystemExit(main())
