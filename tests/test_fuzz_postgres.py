"""tests/test_fuzz.py again, on a throwaway PostgreSQL (see the ``postgres`` fixture).

PostgreSQL refuses what SQLite stores (NUL in text), so bounds that hold on
one database may not on the other.
"""

from tests.test_fuzz import *  # noqa

DATABASE = "postgres"
