"""How a long job talks to whoever started it: log lines, warnings, progress, and "stop now".

One interface for the engine, training, Prepare and the installer; each front end subclasses it
(the CLI prints, the engine process speaks JSON lines, Processing forwards to its feedback, a batch
task counts).  Standard library only, so the QGIS process can use it too.
"""
import sys


class Cancelled(Exception):
    """The user cancelled; outputs were discarded."""


class Reporter:
    """Says nothing and never cancels: the default for callers that want no messages."""

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        self.info("WARNING: " + message)

    def progress(self, percent: float) -> None:
        pass

    def cancelled(self) -> bool:
        return False


class ConsoleReporter(Reporter):
    """Messages on stderr; progress as a percentage every 10 %.  Warnings are printed even when
    ``quiet``: they say a result may be wrong."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream
        self._last = -1

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr)

    def info(self, message):
        if not self.quiet:
            self._print(message)

    def warn(self, message):
        self._print("warning: " + message)

    def progress(self, percent):
        step = int(percent) // 10
        if not self.quiet and step != self._last:
            self._last = step
            self._print(f"  {int(percent)}%")
