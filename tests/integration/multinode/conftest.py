"""The simulated hosts shared by the multi-node tests (tests/helpers/multihost.py): one 2-host
instance per session, built on first use, torn down at the end of the session (also on a failure or
Ctrl-C). A test that kills a host or cuts its link must bring it back (``start_sshd`` /
``restore_link``) before it ends, so that the next test finds both hosts up."""

import pytest

from tests.helpers import multihost


@pytest.fixture(scope="session")
def two_hosts():
    """A :class:`multihost.MultiHost` with 2 hosts; skipped with one reason line where that cannot work."""
    reason = multihost.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with multihost.MultiHost(2) as mh:
        yield mh
