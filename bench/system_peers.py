"""
The peers that come from Debian packages (C{apt-get install postfix
dovecot-pop3d dovecot-imapd}), each run from a configuration written into its own
temporary folder, with its queue, state and mail there too, on a free
127.0.0.1 port.  The system's own setup (C{/etc/postfix}, C{/etc/dovecot},
ports 25 and 110) is neither used nor changed.

 - L{PostfixPeer}: Postfix's smtpd, its queue and its C{virtual} delivery
   agent writing one Maildir; 250 once the queue file is fsynced.
 - L{SmtpSinkPeer}: Postfix's C{smtp-sink} test server, which throws mail
   away: what the SMTP exchange alone costs, a ceiling.
 - L{DovecotPeer}: Dovecot's POP3 and IMAP servers on Maildirs the
   runner fills.

All three must start as root (Postfix's master and Dovecot drop to their
own users; smtp-sink insists on C{-u} when root).  Why each setting is there
is in bench/README.md ("The peers").
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

from bench.peers import Peer, accepting, free_port, wait_for

# The owner of every Maildir a packaged peer writes or reads: Debian's
# "mail" user, which exists on every install, so the system needs no new user.
MAIL_USER = "mail"


def _missing(*paths: Path, users: tuple[str, ...] = ()) -> str | None:
    """
    Why a packaged peer cannot run here (a binary, a user or root missing),
    or None.
    """
    for path in paths:
        if not path.exists():
            return f"{path} not found (apt-get install postfix dovecot-pop3d)"
    for user in users:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no user {user!r}"
    if os.geteuid() != 0:
        return "needs root"
    return None


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid)


def _count_files(folder: Path) -> int:
    total = 0
    for _, _, files in os.walk(folder):
        total += len(files)
    return total


class PostfixPeer(Peer):
    """
    Postfix 3.x run as C{master -c DIR} from the peer's folder: smtpd on
    127.0.0.1:<free port>, mail for C{bob@localhost} (a virtual mailbox
    domain) queued, then delivered by the C{virtual} agent to
    C{mail/localhost/bob/}, a Maildir owned by L{MAIL_USER}.

    Postfix only checks a non-default configuration folder against the
    system C{main.cf}'s C{alternate_config_directories} for commands run by
    other users than root, so as root the system's C{main.cf} and
    C{master.cf} are neither read nor written (only the package's own
    read-only files in C{/etc/postfix}, C{postfix-files} and
    C{dynamicmaps.cf}, are read).
    C{postfix -c DIR check} creates the queue folders first; master then runs
    directly as our child (what C{postfix start-fg} does, minus its shell),
    so it is the session leader whose CPU and memory are measured and whose
    process group is killed at the end.
    """

    name = "postfix"
    delivery = "queued"
    POSTFIX = Path("/usr/sbin/postfix")
    POSTCONF = Path("/usr/sbin/postconf")
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    @classmethod
    def why_unavailable(cls) -> str | None:
        return _missing(cls.POSTFIX, cls.POSTCONF, users=("postfix", MAIL_USER))

    def __init__(self, keep: bool = False) -> None:
        super().__init__(keep)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "lib"
        self.mail_base = self.root / "mail"
        self.maillog = self.root / "maillog"

    def main_cf(self) -> str:
        owner = pwd.getpwnam(MAIL_USER)
        return f"""\
# Written by bench/system_peers.py for one benchmark run (bench/README.md).
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = postfix
maillog_file = {self.maillog}
maillog_file_prefixes = {self.root}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination

# One virtual domain, one Maildir (the trailing / in the map says Maildir).
virtual_mailbox_domains = localhost
virtual_mailbox_base = {self.mail_base}
virtual_mailbox_maps = texthash:{self.config_dir}/vmailbox
virtual_uid_maps = static:{owner.pw_uid}
virtual_gid_maps = static:{owner.pw_gid}
virtual_minimum_uid = {owner.pw_uid}

# 50 clients at once from one address, none of them slowed down.
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_new_tls_session_rate_limit = 0
in_flow_delay = 0

# Work our server does not do either: reverse DNS of the client, DNS of
# anything, the deferred reject of a bad client, biff notifications.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtpd_delay_reject = no
biff = no
"""

    def master_cf(self) -> str:
        # Debian's master.cf with chroot off (a chroot needs copies of /etc
        # files inside the queue folder) and smtpd on our port; services
        # the benchmark never uses (tlsmgr, pipes to other programs) left out.
        return f"""\
# service    type  private unpriv chroot wakeup maxproc command
127.0.0.1:{self.port} inet n - n - - smtpd
pickup       unix  n - n 60    1 pickup
cleanup      unix  n - n -     0 cleanup
qmgr         unix  n - n 300   1 qmgr
rewrite      unix  - - n -     - trivial-rewrite
bounce       unix  - - n -     0 bounce
defer        unix  - - n -     0 bounce
trace        unix  - - n -     0 bounce
verify       unix  - - n -     1 verify
flush        unix  n - n 1000? 0 flush
proxymap     unix  - - n -     - proxymap
proxywrite   unix  - - n -     1 proxymap
smtp         unix  - - n -     - smtp
relay        unix  - - n -     - smtp
showq        unix  n - n -     - showq
error        unix  - - n -     - error
retry        unix  - - n -     - error
discard      unix  - - n -     - discard
local        unix  - n n -     - local
virtual      unix  - n n -     - virtual
anvil        unix  - - n -     1 anvil
scache       unix  - - n -     1 scache
postlog      unix-dgram n - n - 1 postlogd
"""

    def _env(self) -> dict[str, str]:
        return dict(os.environ, MAIL_CONFIG=str(self.config_dir))

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.POSTFIX), "-c", str(self.config_dir), *args],
            env=self._env(), capture_output=True, text=True, timeout=timeout, check=False,
        )

    def log(self) -> str:
        parts = [super().log()]
        if self.maillog.exists():
            parts.append(self.maillog.read_text(errors="replace")[-4000:])
        return "\n".join(p for p in parts if p)

    def start(self, timeout: float = 30.0) -> None:
        postfix = pwd.getpwnam("postfix")
        owner = pwd.getpwnam(MAIL_USER)
        self.root.chmod(0o755)  # postfix and the mail user must get through it
        for d in (self.config_dir, self.queue_dir, self.data_dir, self.mail_base):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)
        os.chown(self.mail_base, owner.pw_uid, owner.pw_gid)
        self.port = free_port()
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(self.master_cf())
        (self.config_dir / "vmailbox").write_text(f"{self.rcpt} localhost/bob/\n")
        check = self._postfix("check")
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed: {check.stdout}{check.stderr}\n{self.log()}")
        daemons = subprocess.run(
            [str(self.POSTCONF), "-c", str(self.config_dir), "-h", "daemon_directory"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
        self._popen([f"{daemons}/master", "-c", str(self.config_dir), "-s"], env=self._env())
        assert self.process is not None
        wait_for(lambda: accepting(self.port), timeout, "postfix", self.process, self.log)

    def stop(self, timeout: float = 15.0) -> None:
        """
        C{postfix stop} (master passes SIGTERM on to its children), then
        L{Peer.stop}: SIGTERM, SIGKILL to the process group if anything is
        left.
        """
        try:
            if self.process is not None and self.process.poll() is None:
                self._postfix("stop", timeout=timeout)
                self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            super().stop(timeout)

    def maildir_new(self) -> Path:
        return self.mail_base / "localhost" / "bob" / "new"

    def delivered(self) -> int:
        try:
            return len(os.listdir(self.maildir_new()))
        except FileNotFoundError:
            return 0

    def queued(self) -> int:
        """
        Messages still in Postfix's queue (queue files in its queues).
        """
        return sum(_count_files(self.queue_dir / q) for q in self.QUEUES)

    def wait_delivered(self, expected: int, timeout: float) -> float:
        """
        Postfix answers 250 once the message is in its queue; the virtual
        agent delivers afterwards.  Wait until C{expected} messages are in
        the Maildir, or the queue is empty (something bounced: the count
        then shows it), or C{timeout}.
        """
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.delivered() >= expected or self.queued() == 0:
                break
            time.sleep(0.02)
        return time.monotonic() - t0


class SmtpSinkPeer(Peer):
    """
    C{smtp-sink} from the postfix package: one process, an event loop,
    PIPELINING advertised, every message read and thrown away.  No storage
    at all, so it shows what the SMTP conversation alone costs on this
    machine: a ceiling for every peer, not a competitor.
    """

    name = "smtp-sink"
    delivery = "discarded"
    SMTP_SINK = Path("/usr/sbin/smtp-sink")

    @classmethod
    def why_unavailable(cls) -> str | None:
        return _missing(cls.SMTP_SINK, users=("nobody",))

    def start(self, timeout: float = 20.0) -> None:
        self.port = free_port()
        # -u: the user to run as after binding (required as root).
        self._popen([str(self.SMTP_SINK), "-u", "nobody", f"127.0.0.1:{self.port}", "1024"])
        assert self.process is not None
        wait_for(lambda: accepting(self.port), timeout, "smtp-sink", self.process, self.log)


class DovecotPeer(Peer):
    """
    Dovecot 2.3 (C{dovecot -F -c <folder>/dovecot.conf}), POP3 and IMAP, on
    127.0.0.1:<free ports>, for the given users (a passwd-file with one
    SHA512-CRYPT hash each, all mapped to L{MAIL_USER}), Maildirs at
    C{mail/<domain>/<local part>/} as our server lays them out.  Everything
    else is Dovecot's default (C{mail_fsync = optimized}, the default UIDL
    format, one login process per connection).
    """

    name = "dovecot"
    DOVECOT = Path("/usr/sbin/dovecot")
    DOVEADM = Path("/usr/bin/doveadm")

    @classmethod
    def why_unavailable(cls) -> str | None:
        return _missing(cls.DOVECOT, cls.DOVEADM, users=("dovecot", "dovenull", MAIL_USER))

    def __init__(self, users: tuple[str, ...], password: str = "bench-password", keep: bool = False) -> None:
        super().__init__(keep)
        self.users = users
        self.password = password
        self.config_path = self.root / "dovecot.conf"
        self.passwd_path = self.root / "users"
        self.mail_base = self.root / "mail"
        self.log_path = self.root / "dovecot.log"

    def maildir(self, address: str) -> Path:
        local, domain = address.lower().rsplit("@", 1)
        return self.mail_base / domain / local

    def own_mailbox(self, path: Path) -> None:
        owner = pwd.getpwnam(MAIL_USER)
        _chown_tree(path, owner.pw_uid, owner.pw_gid)

    @staticmethod
    def protocols() -> list[str]:
        """
        The protocols whose Debian package is installed (dovecot-pop3d,
        dovecot-imapd).
        """
        return [p for p in ("pop3", "imap") if Path(f"/usr/lib/dovecot/{p}").exists()]

    def config(self) -> str:
        owner = pwd.getpwnam(MAIL_USER)
        return f"""\
# Written by bench/system_peers.py for one benchmark run (bench/README.md).
instance_name = bench-dovecot-{self.pop3_port}
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.log_path}
protocols = {" ".join(self.protocols())}
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
mail_location = maildir:{self.mail_base}/%d/%n
first_valid_uid = {owner.pw_uid}
last_valid_uid = {owner.pw_uid}
first_valid_gid = {owner.pw_gid}
last_valid_gid = {owner.pw_gid}
passdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd_path}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""

    def _passwd_file(self) -> str:
        # A salted, iterated hash as a real install stores (ours keeps
        # scrypt, which Dovecot 2.3 lacks); made by doveadm itself.
        hashed = subprocess.run(
            [str(self.DOVEADM), "-c", str(self.config_path), "pw", "-s", "SHA512-CRYPT", "-p", self.password],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
        owner = pwd.getpwnam(MAIL_USER)
        return "".join(
            f"{u}:{hashed}:{owner.pw_uid}:{owner.pw_gid}::{self.maildir(u)}::\n" for u in self.users
        )

    def log(self) -> str:
        parts = [super().log()]
        if self.log_path.exists():
            parts.append(self.log_path.read_text(errors="replace")[-4000:])
        return "\n".join(p for p in parts if p)

    def start(self, timeout: float = 30.0) -> None:
        self.root.chmod(0o755)  # Dovecot's users must get through it
        self.mail_base.mkdir()
        owner = pwd.getpwnam(MAIL_USER)
        os.chown(self.mail_base, owner.pw_uid, owner.pw_gid)
        self.pop3_port = free_port()
        self.imap_port = free_port()
        self.config_path.write_text(self.config())
        self.passwd_path.write_text(self._passwd_file())
        self._popen([str(self.DOVECOT), "-F", "-c", str(self.config_path)])
        assert self.process is not None
        for protocol, port in (("pop3", self.pop3_port), ("imap", self.imap_port)):
            if protocol in self.protocols():
                wait_for(lambda port=port: accepting(port), timeout, "dovecot", self.process, self.log)
            elif protocol == "pop3":
                self.pop3_port = 0
            else:
                self.imap_port = 0


__all__ = ["MAIL_USER", "DovecotPeer", "PostfixPeer", "SmtpSinkPeer"]
