"""
What the server and the console script build from the configuration in the
same way: each room gets its own section and explicit paths, and this is
where a L{Config} is taken apart for the rooms both of them use.
"""

from __future__ import annotations

from mailserver.accounts import Accounts
from mailserver.aliases import AliasesFile
from mailserver.config import Config
from mailserver.tls import CertificateFiles


def accounts_for(config: Config) -> Accounts:
    return Accounts(
        users_path=config.users_path,
        aliases_path=config.aliases_path,
        mail_path=config.mail_path,
        local_domains=config.local_domains,
        subaddress_separator=config.smtp.subaddress_separator,
        catch_all=config.smtp.catch_all,
        relay_domains=config.relay.relay_domains,
        relay_recipients_path=config.relay_recipients_path,
    )


def aliases_file_for(config: Config) -> AliasesFile:
    return AliasesFile(config.aliases_path, config.local_domains)


def certificate_files(config: Config) -> CertificateFiles:
    return CertificateFiles(
        certificate=config.certificate_path,
        key=config.key_path,
        hostname=config.hostname,
        self_signed=not config.tls.certificate,
        source=config.source,
    )
