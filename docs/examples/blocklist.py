"""
An example mailserver plugin: refuse senders from blocked domains, and tag
every message that gets through.

Copy this file into a folder, name the folder in the configuration, and
enable the plugin by its name:

    [plugins]
    paths = ["/etc/mailserver/plugins"]
    enabled = ["blocklist"]

    [plugins.blocklist]
    domains = ["spam.example", "junk.example"]
    code = 550                      # optional, 5xx
"""

from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from mailserver.hooks import PluginOptionsError, Reject
from mailserver.interfaces import IEnvelopeHook, IMessageHook, IPluginFactory


# 1. The hook object: it says which hooks it has with @implementer, and the
#    server calls only those.  Returning None means "carry on".
@implementer(IEnvelopeHook, IMessageHook)
class Blocklist:
    def __init__(self, domains, code):
        self.domains = domains
        self.code = code

    def sender(self, client, address):
        domain = address.rpartition("@")[2].lower()
        if domain in self.domains:
            return Reject(self.code, "5.7.1", f"Mail from {domain} is not accepted here")
        return None

    def recipient(self, client, sender, address):
        return None

    # Hooks may be async (or return a Deferred): await a DNS lookup, an HTTP
    # API, a database...  The client waits; other clients do not.
    async def message(self, envelope, headers, body):
        headers.add("X-Blocklist", "checked")
        return None


# 2. The factory: twisted.plugin finds it because it provides IPlugin and
#    IPluginFactory.  build() checks the options table and makes the hooks;
#    a PluginOptionsError stops start-up with a clear line naming the key.
@provider(IPlugin, IPluginFactory)
class BlocklistPlugin:
    name = "blocklist"
    description = "Refuses senders from listed domains and tags the rest."

    @staticmethod
    def build(options, context):
        domains = options.get("domains", [])
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise PluginOptionsError("domains", "must be a list of domain names")
        code = options.get("code", 550)
        if not isinstance(code, int) or not 500 <= code <= 599:
            raise PluginOptionsError("code", "must be a 5xx reply code")
        return Blocklist(frozenset(d.lower() for d in domains), code)


# 3. A module-level name for twisted.plugin to find.
plugin = BlocklistPlugin
