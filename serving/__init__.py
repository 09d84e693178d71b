"""The gRPC inference service over ``energon_jax.AsyncEngine``.

A request's path: ``servicer.InferenceServicer.Generate`` turns the wire message
into the runtime's ``SamplingParams`` (``convert.py``), streams
``AsyncEngine.submit`` back as ``GenerateResponse`` messages and records latency
and token metrics (``metrics.py``); whatever ends a call early aborts the request
in the engine. ``server.py`` owns the process around it: ports, health,
reflection, the API-key interceptor and TLS (``auth.py``), loading and warm-up,
draining on SIGTERM and the exit code. See ``serving/README.md``.
"""
