"""
Rspamd for the benchmark, and the two servers that ask it about every
message: ours with the C{rspamd} plugin, Postfix through its milter.

 - L{RspamdService}: Debian's C{rspamd} run from a configuration written
   into its own temporary folder (nothing of C{/etc/rspamd} is read), on
   loopback only, with no network look-ups: DNS goes to a port where
   nothing answers and of the Lua plugins only C{milter_headers} is loaded
   (it adds C{X-Spamd-Result}, so a stored message shows it was scanned).
   So the figures are what asking Rspamd costs (the HTTP or milter
   exchange, Rspamd parsing the message and running its core rules), not
   what a full production rule set costs.  Two workers: the normal one our
   plugin asks over HTTP (C{/checkv2}), and the proxy in milter mode
   (C{self_scan}) that Postfix asks.
 - L{MailServerRspamdPeer}: L{MailServerPeer} with C{plugins.enabled =
   ["rspamd"]}.
 - L{PostfixRspamdPeer}: L{PostfixPeer} with C{smtpd_milters} at the proxy.

Both fail a message (451) when Rspamd cannot be asked, rather than accept
it unscanned, so a broken set-up shows up as errors instead of speed; and
Rspamd's CPU is counted with each server's.
"""

from __future__ import annotations

import os
import shutil
import urllib.request

from bench.peers import MailServerPeer, Peer, free_port, wait_for
from bench.system_peers import PostfixPeer

RSPAMD = "rspamd"
SUFFIXES = "test\nbench\nexample\norg\ncom\nnet\n"


class RspamdService(Peer):
    name = "rspamd"

    @classmethod
    def why_unavailable(cls) -> str | None:
        if shutil.which(RSPAMD) is None:
            return "rspamd not found (apt-get install rspamd)"
        return None

    def __init__(self, keep: bool = False) -> None:
        super().__init__(keep)
        self.milter_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.root / "rspamd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else super().log()

    def config(self) -> str:
        return f"""\
# Written by bench/rspamd_peers.py for one benchmark run (bench/README.md).
options {{
  pidfile = "{self.root}/rspamd.pid";
  dns {{ nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 0; }}
  filters = "";
  hs_cache_dir = "{self.root}";
  url_tld = "{self.root}/tld.dat";
  local_addrs = [];
}}
logging {{ type = "file"; filename = "{self.root}/rspamd.log"; level = "warning"; }}
worker "normal" {{
  bind_socket = "127.0.0.1:{self.port}";
  count = 1;
  task_timeout = 8s;
}}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{self.milter_port}";
  milter = yes;
  timeout = 120s;
  count = 1;
  upstream "local" {{ default = yes; self_scan = yes; }}
}}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
modules {{ path = "${{PLUGINSDIR}}/milter_headers.lua"; }}
milter_headers {{
  use = ["x-spamd-result"];
  skip_local = false;
  skip_authenticated = false;
}}
"""

    def start(self, timeout: float = 120.0) -> None:
        self.port, self.milter_port = free_port(), free_port()
        (self.root / "tld.dat").write_text(SUFFIXES)
        (self.root / "rspamd.conf").write_text(self.config())
        command = [RSPAMD, "--no-fork", "--config", str(self.root / "rspamd.conf")]
        if os.geteuid() == 0:  # it will not run its workers as root otherwise
            command += ["--user", "root", "--group", "root", "--insecure"]
        self._popen(command)
        assert self.process is not None
        wait_for(self._pong, timeout, "rspamd", self.process, self.log)

    def _pong(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as answer:
                return answer.read().strip() == b"pong"
        except OSError:
            return False


class MailServerRspamdPeer(MailServerPeer):
    name = "mailserver-rspamd"

    def __init__(self, rspamd: RspamdService, keep: bool = False) -> None:
        super().__init__(keep=keep, extra_toml=(
            '[plugins]\nenabled = ["rspamd"]\n'
            f'[plugins.rspamd]\nurl = "{rspamd.url}"\nfallback = "tempfail"\n'
        ))
        self.helper_pids = (rspamd.pid,)

    def scanned(self) -> bool:
        return _scanned(self.maildir(self.rcpt) / "new")


class PostfixRspamdPeer(PostfixPeer):
    name = "postfix-rspamd"

    def __init__(self, rspamd: RspamdService, keep: bool = False) -> None:
        super().__init__(keep=keep)
        self.rspamd = rspamd
        self.helper_pids = (rspamd.pid,)

    def main_cf(self) -> str:
        # As Rspamd's documentation sets Postfix up, but failing a message
        # when Rspamd cannot be asked (see the module docstring).
        return super().main_cf() + f"""
# Every message through Rspamd's proxy in milter mode.
smtpd_milters = inet:127.0.0.1:{self.rspamd.milter_port}
milter_protocol = 6
milter_mail_macros = i {{mail_addr}} {{client_addr}} {{client_name}} {{auth_authen}}
milter_default_action = tempfail
"""

    def scanned(self) -> bool:
        return _scanned(self.maildir_new())


def _scanned(new) -> bool:
    """
    Does the last message delivered carry Rspamd's verdict?
    """
    try:
        newest = max(new.iterdir(), key=lambda path: path.stat().st_mtime)
    except (OSError, ValueError):
        return False
    return b"X-Spamd-Result:" in newest.read_bytes()
