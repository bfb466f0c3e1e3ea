"""
Installing as a user would: C{pip install -e .} (pip's default editable
mode) and C{pip install .} each give a C{twistd mailserver} that starts, and
a plugin distribution built as docs/plugins.md says is found and run.  A
distribution that drops a module into C{mailserver/plugins/} (the old
advice) breaks nothing either, nor does what it leaves behind when it is
uninstalled.

Offline: each install goes into a fresh virtualenv with no build isolation
and no index; the dependencies come from the test's own environment through
a C{.pth} file.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO, MailServer

PLUGIN_MODULE = '''
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from mailserver.hooks import Reject
from mailserver.interfaces import IEnvelopeHook, IPluginFactory


@implementer(IEnvelopeHook)
class Refuse:
    def __init__(self, local_part, code):
        self.local_part = local_part
        self.code = code

    def sender(self, client, address):
        return None

    def recipient(self, client, sender, address):
        if address.lower().startswith(self.local_part + "@"):
            return Reject(self.code, "5.7.1", self.local_part + "@ is closed, says " + __name__)
        return None


@provider(IPlugin, IPluginFactory)
class CLASS:
    name = "NAME"
    description = "Refuses mail to LOCAL@."

    @staticmethod
    def build(options, context):
        return Refuse("LOCAL", options.get("code", 553))
'''

# The old advice: a distribution holding only mailserver/plugins/NAME.py.
DROPIN_PROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "mailserver-nosales-dropin"
version = "1.0"

[tool.setuptools.packages.find]
include = ["mailserver.plugins"]
namespaces = true
'''


def _site_dirs() -> list[str]:
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]


def _clean_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the installed server, not the checkout
    env.pop("MAILSERVER_CONFIG", None)
    return env


def _run(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        list(args), cwd=cwd, env=_clean_environment(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _venv(path: Path) -> Path:
    """
    A virtualenv that sees the test environment's packages (Twisted...)
    after its own.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    Path(site, "zz_test_environment.pth").write_text("\n".join(_site_dirs()) + "\n")
    problem = subprocess.run(
        [str(python), "-c",
         "import setuptools, sys\n"
         "version = tuple(int(p) for p in setuptools.__version__.split('.')[:2])\n"
         "if version < (70, 1):\n"
         "    import wheel\n"
         "assert version >= (64, 0), setuptools.__version__\n"],
        env=_clean_environment(), capture_output=True, text=True,
    )
    if problem.returncode != 0:
        pytest.skip(
            "needs setuptools>=64 and wheel in the test environment to build offline "
            "(the test extra has them: pip install -e '.[test]')"
        )
    return python


def _pip_install(python: Path, *args: str) -> None:
    _run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", *args)


def _source_copy(path: Path) -> Path:
    """
    What a clone holds of the server, so builds leave nothing in the checkout.
    """
    path.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, path / name)
    ignore = shutil.ignore_patterns("__pycache__", "dropin.cache", "*.pyc")
    for folder in ("mailserver", "twisted"):
        shutil.copytree(REPO / folder, path / folder, ignore=ignore)
    return path


def _plugin_module(cls: str, name: str, local: str) -> str:
    return PLUGIN_MODULE.replace("CLASS", cls).replace("NAME", name).replace("LOCAL", local)


def _documented_project() -> str:
    """
    The pyproject.toml that docs/plugins.md gives for shipping the example.
    """
    guide = (REPO / "docs" / "plugins.md").read_text()
    section = guide[guide.index("## Shipping a plugin as a distribution"):]
    return re.search(r"```toml\n(.*?)```", section, re.S).group(1)


def _plugin_projects(root: Path) -> tuple[Path, Path]:
    """
    The documented example as its own distribution, and a distribution the
    old way: only C{mailserver/plugins/nosales_dropin.py}.
    """
    documented = root / "mailserver-blocklist"
    documented.mkdir()
    (documented / "pyproject.toml").write_text(_documented_project())
    shutil.copy(REPO / "docs" / "examples" / "blocklist.py", documented / "mailserver_blocklist.py")
    dropin = root / "nosales"
    (dropin / "mailserver" / "plugins").mkdir(parents=True)
    (dropin / "pyproject.toml").write_text(DROPIN_PROJECT)
    (dropin / "mailserver" / "plugins" / "nosales_dropin.py").write_text(
        _plugin_module("NoSalesPlugin", "nosales", "sales")
    )
    return documented, dropin


def _server(tmp_path: Path, python: Path, enabled: list[str]) -> MailServer:
    tmp_path.mkdir()
    launcher = tmp_path / "run_twistd.py"
    launcher.write_text("from twisted.scripts.twistd import run\nrun()\n")
    names = ", ".join(f'"{name}"' for name in enabled)
    return MailServer(
        tmp_path,
        roles=("smtp", "admin"),
        extra_toml=f'[plugins]\nenabled = [{names}]\n[plugins.blocklist]\ndomains = ["spam.example"]\n',
        twistd=[str(python), str(launcher)],
        cli=[str(python.parent / "mailserver")],
        env=_clean_environment(),
    )


def _answers(server: MailServer, sender: str, addresses: list[str]) -> list[int]:
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        client.ehlo("client.test")
        code = client.mail(sender)[0]
        if code != 250:
            return [code]
        return [code] + [client.rcpt(address)[0] for address in addresses]


@pytest.mark.parametrize("mode", ["editable", "regular"])
def test_installed_server_starts_and_runs_a_plugin_distribution(tmp_path, mode):
    python = _venv(tmp_path / "venv")
    source = _source_copy(tmp_path / "source")
    _pip_install(python, *(["--editable"] if mode == "editable" else []), str(source))
    where = _run(str(python), "-c", "import mailserver; print(mailserver.__file__)", cwd=tmp_path)
    expected = source if mode == "editable" else tmp_path / "venv"
    assert Path(where.strip()).is_relative_to(expected), where
    usage = _run(str(python), "-c", "from twisted.scripts.twistd import run; run()", "mailserver",
                 "--help", cwd=tmp_path)
    assert "--config" in usage

    documented, dropin = _plugin_projects(tmp_path)
    _pip_install(python, str(documented))
    _pip_install(python, str(dropin))
    server = _server(tmp_path / "run", python, ["blocklist", "nosales"])
    check = server.cli("check-config")
    assert check.returncode == 0, check.stderr
    server.add_user("bob@localhost", "pw")
    server.start()
    try:
        assert _answers(server, "x@spam.example", []) == [550]
        assert _answers(server, "a@example.com", ["sales@localhost", "bob@localhost"]) == [250, 553, 250]
    finally:
        server.stop()
    assert "plugins:         blocklist, nosales" in server.log()

    # Uninstalled, the dropin distribution leaves a mailserver/ folder (and
    # perhaps Twisted's dropin.cache) in site-packages: still no harm.
    _run(str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "mailserver-nosales-dropin")
    server = _server(tmp_path / "again", python, ["blocklist"])
    server.add_user("bob@localhost", "pw")
    server.start()
    try:
        assert _answers(server, "x@spam.example", []) == [550]
        assert _answers(server, "a@example.com", ["bob@localhost"]) == [250, 250]
    finally:
        server.stop()
