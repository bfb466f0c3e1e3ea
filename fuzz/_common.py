"""
What the three harnesses share: the repository on the import path (they
run as scripts), a log observer that turns a logged failure into a crash,
and writing a libFuzzer dictionary and seed inputs so a run starts from real
commands and real key names.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The harnesses use mailserver.testing's fakes and the test suite's oracles
# (imported as tests.protocol..., tests.unit...).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _stop_log_buffering() -> None:
    # Until logging begins, Twisted keeps the last 65,536 log events, and
    # with them every session they name: memory grows for the whole run.
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)


_stop_log_buffering()


_runs = 0


def collect_garbage() -> None:
    """
    Collect the young generations after every input, so a Deferred that
    failed unhandled logs within its input's run; the whole heap every 500
    inputs, since a manual young collection keeps the automatic full one
    from ever running and memory would grow without bound.
    """
    global _runs
    _runs += 1
    gc.collect() if _runs % 500 == 0 else gc.collect(1)


class LoggedFailure(Exception):
    """
    The code under test logged a failure (an exception it did not expect).
    """


class FailureLog:
    """
    While active, collects every event that carries a failure; L{check}
    raises the first one, so the fuzzer records the input as a crash.
    """

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __enter__(self) -> FailureLog:
        from twisted.logger import globalLogPublisher

        self.events.clear()
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc_info) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self._observe)

    def _observe(self, event: dict) -> None:
        if "log_failure" in event:
            self.events.append(event)

    def check(self) -> None:
        if self.events:
            raise LoggedFailure(self.events[0]["log_failure"].getTraceback())


def prepare(argv: list[str], name: str, tokens: list[bytes], seeds: list[bytes]) -> list[str]:
    """
    Write C{fuzz/<name>.dict} from C{tokens} and pass it with C{-dict=}
    unless one is given; if the first corpus folder is empty, put the seeds
    in it.  Returns the arguments for C{atheris.Setup}.
    """
    dictionary = ROOT / "fuzz" / f"{name}.dict"
    dictionary.write_text(
        "".join('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n' for token in tokens)
    )
    argv = list(argv)
    if not any(a.startswith("-dict=") for a in argv[1:]):
        argv.insert(1, f"-dict={dictionary}")
    corpora = [Path(a) for a in argv[1:] if not a.startswith("-")]
    if corpora:
        corpora[0].mkdir(parents=True, exist_ok=True)
        if not any(corpora[0].iterdir()):
            for number, seed in enumerate(seeds):
                (corpora[0] / f"seed-{number}").write_bytes(seed)
    return argv
