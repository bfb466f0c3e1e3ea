"""
The message as it will be stored, from what a message hook sees.
"""

from __future__ import annotations


def whole_message(head: bytes, rest: bytes) -> bytes:
    """
    C{head} is C{MessageHeaders.to_bytes()}; C{rest} is C{MessageBody.read()},
    the body after the empty line that ends the header section.
    """
    return head + b"\r\n" + rest
