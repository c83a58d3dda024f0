"""tests/test_resume.py again, on a throwaway PostgreSQL (see the ``postgres`` fixture)."""

from tests.test_resume import *  # noqa

DATABASE = "postgres"
