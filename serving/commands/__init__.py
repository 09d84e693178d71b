"""``energon serve``, ``energon client`` and ``energon bench`` subcommands."""
