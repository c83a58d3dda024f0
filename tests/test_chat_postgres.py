"""tests/test_chat.py again, on a throwaway PostgreSQL (see the ``postgres`` fixture)."""

from tests.test_chat import *  # noqa

DATABASE = "postgres"
