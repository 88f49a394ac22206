"""SIGTERM as an exception, for processes we own (CLI, worker) — stdlib only, so the
install commands that run on a bare Python can use it too."""
import signal


class Terminated(BaseException):
    """The process got SIGTERM; raised in the main thread so every ``finally`` and
    cleanup handler runs (a BaseException, so ``except Exception`` does not eat it)."""


def raise_on_sigterm():
    """Turn SIGTERM into ``Terminated`` in the main thread, so a terminated run discards its
    partial outputs like a cancelled one.  For processes we own (CLI, worker), never QGIS.
    Returns the previous handler (to restore with ``signal.signal``)."""
    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")
    return signal.signal(signal.SIGTERM, handler)
