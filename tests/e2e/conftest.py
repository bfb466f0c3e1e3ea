import pytest

from harness import MailServer


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def server(tmp_path):
    """
    A started server on OS-chosen loopback ports with a fresh data folder.
    """
    mail_server = MailServer(tmp_path)
    mail_server.start()
    yield mail_server
    mail_server.stop()
