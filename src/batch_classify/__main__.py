"""``python -m batch_classify``: the ``batch-classify`` command."""

from batch_classify.commands.cli import main

raise SystemExit(main())
