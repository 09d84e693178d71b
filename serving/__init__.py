"""The gRPC inference service over energon_jax.AsyncEngine."""
