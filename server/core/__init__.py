"""Core: the wire protocol, errors, configuration, tokens, limits, log redaction and
background-task plumbing. Imports nothing above it."""
