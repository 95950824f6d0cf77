"""``lenvm serve``: an OpenAI-compatible HTTP server over the decoding engine, with length control
per request, length prediction and per-token values (needs ``pip install "lenvm[serve]"``).

    from lenvm.serve import ServerSettings, create_app, serve

Modules: ``protocol`` (the OpenAI wire format and what a request asks of the engine), ``runner``
(the engine's loop on one background thread, continuous batching), ``detokenizer`` (an answer's
text token by token), ``metrics`` (Prometheus),
``app`` (routes, limits, auth, shutdown).
"""

from lenvm.serve.app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
