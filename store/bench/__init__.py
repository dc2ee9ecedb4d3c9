"""The store's micro-benchmark (`python -m store.bench`; micro.py says what it measures)."""
