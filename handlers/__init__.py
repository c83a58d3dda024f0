"""Tornado handlers: one WebSocket handler per namespace on a shared base, plus HTTP."""
