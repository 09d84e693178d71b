"""Generated-code package for the ``energon`` proto namespace."""
