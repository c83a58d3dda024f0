"""Switchboard beside its peers (issue 16): ``python -m bench.peers``; see bench/README.md."""
