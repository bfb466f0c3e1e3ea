"""
Log observers for twistd's C{--logger} option.

C{twistd --logger=mailserver.logs.json_stdout -n mailserver} writes one JSON
object per event (twisted.logger's format, one per line) for log shippers;
without it twistd writes its usual text lines.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_stdout() -> ILogObserver:
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
