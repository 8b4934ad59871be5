"""The OpenAI-compatible embedding server: ``create_app(backend, settings)`` and its parts."""
