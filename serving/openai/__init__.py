"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), served beside gRPC over the same engine.

``app.py`` (routes), ``protocol.py`` (pydantic bodies), ``generation.py`` (completions
and chat over the shared admission path), ``chat_template.py`` (sandboxed Jinja2),
``errors.py`` (OpenAI's error shape), ``http_server.py`` (uvicorn in the server's loop).
"""
