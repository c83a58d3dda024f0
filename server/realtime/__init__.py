"""The realtime layer: the hub (who is connected, who is in which room, delivery),
the broker it composes (memory or Redis), the outbound writer with its budget,
and the single-node presence interface."""
