"""Generated stubs of ``energon/v1/inference.proto`` (do not edit; regenerate)."""
