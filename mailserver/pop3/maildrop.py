"""
The TRANSACTION state's view of a locked mailbox (RFC 1939 section 5).

Message numbers are fixed when the session logs in; C{DELE} only marks a
message, which every later command except C{RSET} then refuses; the marked
messages are removed at C{QUIT}.  A message is an
L{mailserver.interfaces.IStoredMessage} of the mailbox.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class NoSuchMessage(Exception):
    """
    A message argument that names no live message; C{str()} is the text of
    the C{-ERR} reply.
    """


class Maildrop:
    def __init__(self, messages: Sequence) -> None:
        self._messages = list(messages)
        self._deleted: set[int] = set()
        # Running totals: STAT and LIST on 100,000 messages need no sum.
        self._octets = sum(info.size for info in self._messages)
        self._deleted_octets = 0

    def lookup(self, argument: str) -> tuple[int, object]:
        """
        The live message a command argument names.

        @raise NoSuchMessage: for anything but a decimal number of a message
            that exists and is not marked deleted.
        """
        if not (argument.isascii() and argument.isdigit()):
            # Control characters are escaped: a CR or NUL echoed back could
            # split or cut the reply line.
            shown = "".join(
                c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                for c in argument
            )
            raise NoSuchMessage(f"Invalid message number: {shown}")
        if len(argument.lstrip("0")) > 18:  # int() refuses 4,300 digits and more
            raise NoSuchMessage("There's no such message.")
        number = int(argument)
        if not 1 <= number <= len(self._messages):
            raise NoSuchMessage(f"There's no message {number}.")
        if number in self._deleted:
            raise NoSuchMessage(f"Message {number} is deleted.")
        return number, self._messages[number - 1]

    def live(self) -> list[tuple[int, object]]:
        """
        Every message not marked deleted, with its number.
        """
        return [
            (number, info)
            for number, info in enumerate(self._messages, 1)
            if number not in self._deleted
        ]

    def following(self, number: int) -> Iterator[object]:
        """
        The live messages after message C{number}, in order.
        """
        messages, deleted = self._messages, self._deleted
        for later in range(number + 1, len(messages) + 1):
            if later not in deleted:
                yield messages[later - 1]

    def count_and_octets(self) -> tuple[int, int]:
        return (
            len(self._messages) - len(self._deleted),
            self._octets - self._deleted_octets,
        )

    def mark_deleted(self, number: int) -> None:
        if number not in self._deleted:
            self._deleted.add(number)
            self._deleted_octets += self._messages[number - 1].size

    def reset(self) -> None:
        self._deleted.clear()
        self._deleted_octets = 0

    def marked_deleted(self) -> list:
        return [self._messages[number - 1] for number in sorted(self._deleted)]
