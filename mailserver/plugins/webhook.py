"""
The built-in C{webhook} plugin: POST a JSON summary of every final delivery.

::

    [plugins]
    enabled = ["webhook"]

    [plugins.webhook]
    url = "https://hooks.example.org/mail"   # required
    timeout = 10                             # seconds per attempt
    retries = 3                              # attempts after the first
    retry_delay = 5                          # seconds, doubled each retry
    token = ""                               # sent as "Authorization: Bearer ..."

The POST happens after the fact and in the background: a slow or broken
receiver never delays or loses mail, it only gets logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import treq
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from mailserver.hooks import Delivery, PluginContext, PluginOptionsError
from mailserver.interfaces import IDeliveredHook, IPluginFactory


def summary(event: Delivery) -> dict[str, object]:
    return {
        "queue_id": event.queue_id,
        "sender": event.sender,
        "recipient": event.recipient,
        "status": event.status,
        "size": event.size,
        "detail": event.detail,
        "time": time.time(),
    }


@implementer(IDeliveredHook)
class Webhook:
    log = Logger()

    def __init__(
        self,
        *,
        url: str,
        reactor,
        timeout: float = 10,
        retries: int = 3,
        retry_delay: float = 5,
        token: str = "",
        http: treq.client.HTTPClient | None = None,
    ) -> None:
        self.url = url
        self._reactor = reactor
        self._timeout = timeout
        self._retries = retries
        self._retry_delay = retry_delay
        self._headers = {b"Content-Type": [b"application/json"]}
        if token:
            self._headers[b"Authorization"] = [b"Bearer " + token.encode("ascii")]
        self._http = http or treq.client.HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor))
        )
        self.pending: set[defer.Deferred] = set()

    def delivered(self, event: Delivery) -> None:
        body = json.dumps(summary(event)).encode("utf-8")
        d = defer.ensureDeferred(self._post(body, event.queue_id))
        self.pending.add(d)
        # Nobody waits for this Deferred: a bug in _post is logged here,
        # not dropped.
        d.addErrback(
            lambda failure: self.log.failure(
                "webhook {url} failed for {id}", failure, url=self.url, id=event.queue_id,
                event="webhook.failed", log_system="webhook.failed#critical",
            )
        )
        d.addBoth(lambda _: self.pending.discard(d))

    async def _post(self, body: bytes, queue_id: str) -> None:
        for attempt in range(self._retries + 1):
            if attempt:
                delay = self._retry_delay * 2 ** (attempt - 1)
                await task.deferLater(self._reactor, delay, lambda: None)
            try:
                response = await self._http.post(
                    self.url,
                    data=body,
                    headers=self._headers,
                    timeout=self._timeout,
                    reactor=self._reactor,
                )
                await response.content()
            except Exception as e:
                problem = str(e) or type(e).__name__
            else:
                if 200 <= response.code < 300:
                    return
                problem = f"HTTP {response.code}"
                if 400 <= response.code < 500 and response.code not in (408, 429):
                    self.log.warn(
                        "webhook {url} refused {id}: {problem}", url=self.url, id=queue_id,
                        problem=problem, event="webhook.refused", log_system="webhook.refused#warn",
                    )
                    return
            self.log.warn(
                "webhook {url} failed for {id} (attempt {n}): {problem}",
                url=self.url,
                id=queue_id,
                n=attempt + 1,
                problem=problem,
                event="webhook.retry",
                log_system="webhook.retry#warn",
            )
        self.log.error("webhook {url} gave up on {id}", url=self.url, id=queue_id,
                       event="webhook.gave_up", log_system="webhook.gave_up#error")


def _number(options: Mapping[str, object], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise PluginOptionsError(key, "must be a non-negative number")
    return value


@provider(IPlugin, IPluginFactory)
class WebhookPlugin:
    name = "webhook"
    description = "POSTs a JSON summary of each final delivery to a URL."

    @staticmethod
    def build(options: Mapping[str, object], context: PluginContext) -> Webhook:
        known = {"url", "timeout", "retries", "retry_delay", "token"}
        for key in options:
            if key not in known:
                raise PluginOptionsError(key, "unknown option")
        url = options.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise PluginOptionsError("url", "must be an http:// or https:// URL")
        token = options.get("token", "")
        if not isinstance(token, str) or not token.isascii():
            raise PluginOptionsError("token", "must be an ASCII string")
        retries = options.get("retries", 3)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise PluginOptionsError("retries", "must be an integer from 0 to 20")
        return Webhook(
            url=url,
            reactor=context.reactor,
            timeout=_number(options, "timeout", 10),
            retries=retries,
            retry_delay=_number(options, "retry_delay", 5),
            token=token,
        )


plugin = WebhookPlugin
