"""`clp serve`: an OpenAI-compatible HTTP server over the one decoding loop.

    from clpdecode.serve import create_app
    app = create_app(backbone, drafter, method="verified")   # a FastAPI app; run it with uvicorn

FastAPI is imported on first use, so that other `clp` commands do not pay for it.
"""

__all__ = ["Server", "create_app"]


def __getattr__(name):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
