"""tests/test_notifications.py and tests/test_api.py again, on a throwaway PostgreSQL."""

from tests.test_api import *  # noqa
from tests.test_notifications import *  # noqa

DATABASE = "postgres"
