"""
The C{Authentication-Results} header field (RFC 8601): reading the
authserv-id of fields that arrived, and writing ours with C{authres}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailserver.mailauth.dmarc import Verdict
from mailserver.safe_text import printable

FIELD = "Authentication-Results"
_MAX_COMMENT = 200


@dataclass(frozen=True)
class SPFResult:
    """
    @ivar identity: C{"mailfrom"} or C{"helo"}; C{value} is the address or
        name checked.
    """

    identity: str
    value: str
    result: str
    reason: str = ""


@dataclass(frozen=True)
class DKIMResult:
    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Report:
    """
    Every verdict for one message.  C{spf} holds the MAIL FROM result first
    (absent for the null sender), then HELO's.
    """

    spf: tuple[SPFResult, ...] = ()
    dkim: tuple[DKIMResult, ...] = ()
    dmarc: Verdict = field(default_factory=lambda: Verdict("none"))

    def spf_for_policy(self) -> SPFResult | None:
        """
        The SPF result DMARC and the SPF policy use: MAIL FROM's, or HELO's
        for the null sender (RFC 7208 2.4).
        """
        return self.spf[0] if self.spf else None


_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def authserv_id(value: str) -> str:
    """
    The authserv-id that an C{Authentication-Results} value starts with,
    lower case, without comments or quotes (C{""} when there is none).
    """
    text = value
    for _ in range(5):  # nested comments, at most a few levels
        text = _COMMENT.sub(" ", text)
    match = re.match(r'\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;]+))', text)
    if not match:
        return ""
    found = match.group(1) if match.group(1) is not None else match.group(2)
    return found.replace("\\", "").lower().rstrip(".")


def _clean(text: str) -> str:
    text = re.sub(r"[^\x20-\x7e]", "?", text).replace("(", "[").replace(")", "]")
    return text.replace("\\", "/")[:_MAX_COMMENT]


def _resinfos(report: Report) -> list:
    from authres import (
        AuthenticationResultProperty,
        DKIMAuthenticationResult,
        SPFAuthenticationResult,
    )
    from authres.dmarc import DMARCAuthenticationResult

    out: list = []
    for spf in report.spf:
        kwargs = {"smtp_mailfrom" if spf.identity == "mailfrom" else "smtp_helo":
                  printable(spf.value)}
        out.append(SPFAuthenticationResult(
            result=spf.result, result_comment=_clean(spf.reason) or None, **kwargs))
    for dkim in report.dkim:
        properties = []
        if dkim.b:
            properties.append(AuthenticationResultProperty("header", "b", dkim.b))
        result = DKIMAuthenticationResult(
            result=dkim.result, result_comment=_clean(dkim.reason) or None,
            header_d=printable(dkim.domain) or None, header_s=printable(dkim.selector) or None,
            header_a=printable(dkim.algorithm) or None)
        result.properties.extend(properties)
        out.append(result)
    if not report.dkim:
        out.append(DKIMAuthenticationResult(result="none"))
    verdict = report.dmarc
    comment = verdict.reason
    if verdict.record is not None:
        comment = f"p={verdict.record.p} sp={verdict.record.sp} dis={verdict.disposition}"
    out.append(DMARCAuthenticationResult(
        result=verdict.result, result_comment=_clean(comment) or None,
        header_from=printable(verdict.domain) or None))
    return out


def render(authserv: str, report: Report) -> bytes:
    """
    The whole field, one result per line, folded with CRLF and a tab.
    """
    lines = [f"{FIELD}: {authserv}"]
    lines += [str(resinfo) for resinfo in _resinfos(report)]
    text = ";\r\n\t".join(lines) + "\r\n"
    return text.encode("utf-8")
