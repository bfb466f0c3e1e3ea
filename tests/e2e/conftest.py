import pytest

from harness import MailServer
from relay_fixtures import REMOTE_ZONE, DNSServer


@pytest.fixture
def server(tmp_path):
    """
    A started server on OS-chosen loopback ports with a fresh data folder.
    """
    mail_server = MailServer(tmp_path)
    mail_server.start()
    yield mail_server
    mail_server.stop()


@pytest.fixture
def dns_server():
    """
    The loopback DNS server with L{REMOTE_ZONE}; a module with records of
    its own defines its own C{dns_server}.
    """
    server = DNSServer(REMOTE_ZONE)
    yield server
    server.stop()
