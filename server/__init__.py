"""Switchboard: a real-time WebSocket gateway on Tornado."""

__version__ = "0.1.0"
