"""Command-line tools around a trained HierVL model (``python -m hiervl.tools.<name>``)."""
