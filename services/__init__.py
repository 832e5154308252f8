"""Compression Explorer's services: the API the UI and CLI call, the worker, and the engine."""
