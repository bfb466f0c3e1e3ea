"""
The SMTP command grammar: pure functions from a command line to frozen values.

Production names follow RFC 5321 section 4.1.2 (with the RFC 6531 UTF-8
extensions of C{atext}, C{qtextSMTP} and C{sub-domain}); ESMTP parameters
follow RFC 1870 (SIZE), RFC 6152 (BODY), RFC 3461 (RET, ENVID, NOTIFY,
ORCPT), RFC 6531 (SMTPUTF8) and RFC 4954 (AUTH).  Nothing here knows about
sessions or replies: problems are raised as L{GrammarError}.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass


class GrammarError(ValueError):
    """
    The text does not match the grammar.  C{enhanced} is the RFC 3463 code
    that best says why (5.5.2 syntax, 5.5.4 bad parameter, 5.1.3/5.1.7 bad
    address); C{code} the reply code: 555 for a parameter we do not know or
    cannot take (RFC 5321 4.1.1.11), else 501 (syntax).
    """

    def __init__(self, message: str, enhanced: str = "5.5.2", code: int | None = None) -> None:
        super().__init__(message)
        self.enhanced = enhanced
        self.code = code if code is not None else (555 if enhanced == "5.5.4" else 501)


# RFC 5321 4.1.2 plus RFC 6531 3.3: UTF8-non-ascii may appear in atext,
# qtextSMTP and sub-domain.
_CONTROL_OCTET = re.compile(rb"[\x00-\x1f\x7f]")
_UTF8 = "\u0080-\U0010ffff"
_ATEXT = f"[A-Za-z0-9!#$%&'*+\\-/=?^_`{{|}}~{_UTF8}]"
_DOT_STRING = re.compile(f"{_ATEXT}+(?:\\.{_ATEXT}+)*")
_QUOTED_STRING = re.compile(f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{_UTF8}]|\\\\[\\x20-\\x7e])*"')
_LET_DIG = f"[A-Za-z0-9{_UTF8}]"
_SUB_DOMAIN = f"{_LET_DIG}(?:[A-Za-z0-9\\-{_UTF8}]*{_LET_DIG})?"
_DOMAIN = re.compile(f"{_SUB_DOMAIN}(?:\\.{_SUB_DOMAIN})*")
# A Domain with the trailing dot of an absolute name, which RFC 5321 does not
# allow and Postfix accepts (and drops); so do we.
_DOMAIN_OR_ABSOLUTE = re.compile(f"({_DOMAIN.pattern})\\.?")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[\x21-\x5a\x5e-\x7e]+")
_AT_DOMAIN_LIST = re.compile(
    f"@(?:{_DOMAIN.pattern}|{_ADDRESS_LITERAL.pattern})"
    f"(?:,@(?:{_DOMAIN.pattern}|{_ADDRESS_LITERAL.pattern}))*:"
)
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE = re.compile(f"[\\x21-\\x3c\\x3e-\\x7e{_UTF8}]+")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_VERB = re.compile(rb"[A-Za-z]{1,16}")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True)
class Command:
    """
    A command line split into its verb (upper case) and argument text.
    """

    verb: str
    argument: str


@dataclass(frozen=True)
class Mailbox:
    """
    RFC 5321 C{Mailbox}: C{Local-part "@" ( Domain / address-literal )}.

    @ivar local: the local part; a quoted string that needs no quotes is
        stored unquoted (RFC 5321 4.1.2 says both forms are the same
        mailbox), otherwise with its quotes.
    @ivar domain: the domain, or an address literal with its brackets;
        C{""} only for the special C{<Postmaster>} recipient.
    """

    local: str
    domain: str

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_ascii(self) -> bool:
        return self.address.isascii()

    @property
    def is_address_literal(self) -> bool:
        return self.domain.startswith("[")


@dataclass(frozen=True)
class PathArgument:
    """
    The argument of MAIL or RCPT: the path (C{None} for the null
    reverse-path C{<>}) and the ESMTP parameters as C{(KEYWORD, value)}
    pairs, keywords upper-cased, value C{None} when absent.
    """

    mailbox: Mailbox | None
    parameters: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class MailOptions:
    """
    The MAIL parameters this server understands, checked.
    """

    size: int | None = None
    body: str = "7BIT"
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False


@dataclass(frozen=True)
class RecipientOptions:
    """
    The RCPT parameters this server understands (RFC 3461), checked.
    """

    notify: tuple[str, ...] = ()
    orcpt: str | None = None


def parse_command(line: bytes) -> Command:
    """
    Split a command line (without its CRLF) into verb and argument.

    The argument must be UTF-8 without control characters; RFC 5321 allows
    only ASCII, RFC 6531 adds UTF-8 in addresses.
    """
    verb_bytes, _, rest = line.partition(b" ")
    if not _VERB.fullmatch(verb_bytes):
        raise GrammarError("Error: command not recognized")
    try:
        argument = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise GrammarError("Error: command is not valid UTF-8") from None
    # On the bytes: in UTF-8 these octets never occur inside a character.
    if _CONTROL_OCTET.search(rest):
        raise GrammarError("Error: command contains control characters")
    return Command(verb_bytes.decode("ascii").upper(), argument)


def _local_part(text: str, start: int) -> tuple[str, int]:
    """
    RFC 5321 C{Local-part = Dot-string / Quoted-string}.
    """
    if text.startswith('"', start):
        match = _QUOTED_STRING.match(text, start)
        if match is None:
            raise GrammarError("bad quoted local part")
        inner = re.sub(r"\\(.)", r"\1", match.group()[1:-1])
        if _DOT_STRING.fullmatch(inner):
            return inner, match.end()
        return match.group(), match.end()
    match = _DOT_STRING.match(text, start)
    if match is None:
        raise GrammarError("bad local part")
    return match.group(), match.end()


def _check_address_literal(literal: str) -> None:
    """
    RFC 5321 4.1.3: IPv4, C{IPv6:} or a general (tagged) literal.
    """
    inner = literal[1:-1]
    if inner[:5].upper() == "IPV6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise GrammarError("bad IPv6 address literal") from None
        return
    try:
        ipaddress.IPv4Address(inner)
        return
    except ValueError:
        pass
    if not _GENERAL_LITERAL.fullmatch(inner):
        raise GrammarError("bad address literal")


def _domain(text: str, start: int) -> tuple[str, int]:
    """
    C{Domain / address-literal}; domain names are lower-cased.
    """
    if text.startswith("[", start):
        match = _ADDRESS_LITERAL.match(text, start)
        if match is None:
            raise GrammarError("bad address literal")
        _check_address_literal(match.group())
        return match.group(), match.end()
    match = _DOMAIN_OR_ABSOLUTE.match(text, start)
    if match is None:
        raise GrammarError("bad domain")
    return match.group(1).lower(), match.end()


def parse_mailbox(text: str) -> Mailbox:
    """
    A whole C{Mailbox}, e.g. an address a plugin rewrote a recipient to.
    """
    mailbox, end = _mailbox(text, 0)
    if end != len(text):
        raise GrammarError("junk after the address")
    return mailbox


def _mailbox(text: str, start: int) -> tuple[Mailbox, int]:
    local, position = _local_part(text, start)
    if not text.startswith("@", position):
        raise GrammarError("missing @domain")
    domain, position = _domain(text, position + 1)
    if len(local.encode()) > 64 or len(domain.encode()) > 255:
        raise GrammarError("address too long")
    return Mailbox(local, domain), position


def _path(text: str, start: int, *, null_ok: bool, postmaster_ok: bool) -> tuple[Mailbox | None, int]:
    """
    C{Path = "<" [ A-d-l ":" ] Mailbox ">"}; the source route is parsed and
    dropped (RFC 5321 4.1.1.3: servers SHOULD ignore it).  A bare mailbox
    without brackets is accepted, as Postfix does, for old clients.
    """
    if not text.startswith("<", start):
        end = text.find(" ", start)
        end = len(text) if end < 0 else end
        if end == start:
            raise GrammarError("missing address")
        return _mailbox_or_postmaster(text[start:end], postmaster_ok), end
    position = start + 1
    if null_ok and text.startswith(">", position):
        return None, position + 1
    route = _AT_DOMAIN_LIST.match(text, position)
    if route is not None:
        position = route.end()
    close = _closing_bracket(text, position)
    if close < 0:
        raise GrammarError("missing >")
    return _mailbox_or_postmaster(text[position:close], postmaster_ok), close + 1


def _closing_bracket(text: str, start: int) -> int:
    """
    Where the path's C{>} is: the first one outside a quoted string, whose
    C{\\"} does not end it; -1 when there is none.
    """
    close = text.find(">", start)
    if text.find('"', start, len(text) if close < 0 else close) < 0:
        return close  # no quoted string before it: most paths
    quoted = False
    position = start
    while position < len(text):
        c = text[position]
        if quoted and c == "\\":
            position += 1
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return position
        position += 1
    return -1


def _mailbox_or_postmaster(text: str, postmaster_ok: bool) -> Mailbox:
    if postmaster_ok and text.lower() == "postmaster":
        return Mailbox("postmaster", "")
    return parse_mailbox(text)


def _parameters(text: str) -> tuple[tuple[str, str | None], ...]:
    """
    C{Mail-parameters = esmtp-param *(SP esmtp-param)}.
    """
    parameters: list[tuple[str, str | None]] = []
    seen = set()
    for item in text.split(" "):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(keyword):
            raise GrammarError(f"bad parameter {item[:40]!r}", "5.5.4")
        if equals and not _ESMTP_VALUE.fullmatch(value):
            raise GrammarError(f"bad value for {keyword}", "5.5.4")
        keyword = keyword.upper()
        if keyword in seen:
            raise GrammarError(f"{keyword} given twice", "5.5.4")
        seen.add(keyword)
        parameters.append((keyword, value if equals else None))
    return tuple(parameters)


def _path_argument(argument: str, keyword: str, *, null_ok: bool, postmaster_ok: bool) -> PathArgument:
    if argument[: len(keyword)].upper() != keyword:
        raise GrammarError(f"Syntax: {keyword}<address>")
    position = len(keyword)
    while argument.startswith(" ", position):  # "MAIL FROM: <a@b>", as Postfix allows
        position += 1
    mailbox, end = _path(argument, position, null_ok=null_ok, postmaster_ok=postmaster_ok)
    rest = argument[end:]
    if rest and not rest.startswith(" "):
        raise GrammarError("junk after the address")
    return PathArgument(mailbox, _parameters(rest))


def parse_mail(argument: str) -> PathArgument:
    """
    C{"MAIL FROM:" Reverse-path [SP Mail-parameters]}: the argument after
    the verb.
    """
    try:
        return _path_argument(argument, "FROM:", null_ok=True, postmaster_ok=False)
    except GrammarError as e:
        if e.enhanced == "5.5.2" and argument[:5].upper() == "FROM:":
            raise GrammarError(f"Bad sender address syntax: {e}", "5.1.7") from None
        raise


def parse_rcpt(argument: str) -> PathArgument:
    """
    C{"RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" / Forward-path )
    [SP Rcpt-parameters]}.
    """
    try:
        return _path_argument(argument, "TO:", null_ok=False, postmaster_ok=True)
    except GrammarError as e:
        if e.enhanced == "5.5.2" and argument[:3].upper() == "TO:":
            raise GrammarError(f"Bad recipient address syntax: {e}", "5.1.3") from None
        raise


def decode_xtext(text: str) -> str:
    """
    RFC 3461 4: C{+XX} is the character with hex value XX.
    """
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _xtext(value: str, name: str) -> str:
    """
    RFC 3461 4: C{xtext}, kept encoded as the client sent it.  Decoded, it
    must be printable US-ASCII (RFC 3461 4.2 and 4.4), since it is written
    into delivery reports as it is: a CR or LF there would let the client
    add lines of its own.  Refused with 501 5.5.4, as Postfix does.
    """
    if not _XTEXT.fullmatch(value):
        raise GrammarError(f"Bad {name} parameter syntax: not xtext", "5.5.4", 501)
    if not _PRINTABLE_ASCII.fullmatch(decode_xtext(value)):
        raise GrammarError(
            f"Bad {name} parameter syntax: not printable US-ASCII", "5.5.4", 501
        )
    return value


def mail_options(parameters: tuple[tuple[str, str | None], ...]) -> MailOptions:
    """
    Check the MAIL parameters; unknown ones are refused (RFC 5321 4.1.1.11).
    """
    options: dict[str, object] = {}
    for keyword, value in parameters:
        if keyword == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise GrammarError("SIZE needs a number", "5.5.4")
            options["size"] = int(value)
        elif keyword == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise GrammarError("BODY must be 7BIT or 8BITMIME", "5.5.4")
            options["body"] = value.upper()
        elif keyword == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise GrammarError("RET must be FULL or HDRS", "5.5.4")
            options["ret"] = value.upper()
        elif keyword == "ENVID":
            if value is None or len(value) > 100:
                raise GrammarError("ENVID needs a value of at most 100 characters", "5.5.4", 501)
            options["envid"] = _xtext(value, "ENVID")
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise GrammarError("SMTPUTF8 takes no value", "5.5.4")
            options["smtputf8"] = True
        elif keyword == "AUTH":
            # RFC 4954 5: accepted and not trusted, since we relay nothing
            # on another server's word.
            if value is None:
                raise GrammarError("AUTH needs a value", "5.5.4")
        else:
            raise GrammarError(f"Unsupported parameter {keyword}", "5.5.4")
    return MailOptions(**options)  # type: ignore[arg-type]


_NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")


def recipient_options(parameters: tuple[tuple[str, str | None], ...]) -> RecipientOptions:
    """
    Check the RCPT parameters (RFC 3461 4.1, 4.2).
    """
    notify: tuple[str, ...] = ()
    orcpt = None
    for keyword, value in parameters:
        if keyword == "NOTIFY":
            items = tuple(v.upper() for v in (value or "").split(","))
            if items == ("NEVER",):
                notify = items
            elif items and all(i in _NOTIFY_VALUES for i in items) and len(set(items)) == len(items):
                notify = items
            else:
                raise GrammarError("NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY", "5.5.4")
        elif keyword == "ORCPT":
            address_type, semicolon, address = (value or "").partition(";")
            if not semicolon or not _ESMTP_KEYWORD.fullmatch(address_type) or not address:
                raise GrammarError("Bad ORCPT parameter syntax: not addr-type;xtext", "5.5.4", 501)
            orcpt = f"{address_type};{_xtext(address, 'ORCPT')}"
        else:
            raise GrammarError(f"Unsupported parameter {keyword}", "5.5.4")
    return RecipientOptions(notify, orcpt)


def parse_domain_argument(argument: str) -> str:
    """
    The argument of HELO/EHLO: a C{Domain} or C{address-literal}.  Postfix
    accepts any single word here, since many clients send bad names; so do
    we, as long as it is printable and has no spaces.
    """
    argument = argument.strip(" ")
    if not argument or " " in argument or len(argument) > 255:
        raise GrammarError("Syntax: EHLO hostname")
    return argument


def is_domain(text: str) -> bool:
    """
    Whether C{text} is an RFC 5321 C{Domain} (for ETRN's node name).
    """
    return _DOMAIN.fullmatch(text) is not None
