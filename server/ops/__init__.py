"""Operations: Prometheus metrics, sliding-window stats and health."""
