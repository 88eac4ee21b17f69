"""Hypothesis settings for the fuzz suite: one fixed profile, bounded in time.

Every property test here runs under the "mailfc-fuzz" profile: a fixed number of
examples (the whole directory's property tests take well under a minute on two
cores) and no per-example deadline (a loaded CI machine must not turn a slow example
into a failure).  With CI=true the examples are derandomized, so a CI run is
reproducible; elsewhere each run tries new inputs.  No example database is written
(a failure prints its minimal input and a reproduction blob instead).

`bench/fuzz.py` loads the "mailfc-fuzz-long" profile for its longer runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.logcheck import Tracebacks

SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "mailfc-fuzz", max_examples=120, deadline=None, database=None, print_blob=True,
    derandomize=os.environ.get("CI") == "true", suppress_health_check=SUPPRESSED)
settings.register_profile(
    "mailfc-fuzz-long", max_examples=2000, deadline=None, database=None, print_blob=True,
    suppress_health_check=SUPPRESSED)
settings.load_profile(os.environ.get("MAILFC_FUZZ_PROFILE", "mailfc-fuzz"))


@pytest.fixture(scope="module")
def tracebacks() -> Iterator[Tracebacks]:
    """Every record with an exception that mailfc's loggers emit during the module."""
    handler = Tracebacks()
    logger = logging.getLogger("mailfc")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
