"""The demo pipelines ``embforge quickstart`` and ``embforge nomic-cpu`` run: users of the library,
never imported by it (only the CLI runs them; tests/unit/test_boundaries.py checks this)."""
