"""``elmtune serve``: FastAPI app (``app``), routes (``routes``), bodies (``schemas``), batching engine (``engine``)."""

from .app import build_state, create_app, serve

__all__ = ["build_state", "create_app", "serve"]
