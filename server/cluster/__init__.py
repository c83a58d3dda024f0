"""The cluster over Redis: the Redis broker (the mirror), the link with its circuit
breaker and Lua scripts, cluster-wide presence and limits, and the node registry."""
