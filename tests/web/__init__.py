"""Helpers for the web client and browser tests (tests/test_web_*.py)."""
