"""The ``rwkvtools`` console command (and ``python -m rwkvtools``): signal handling first, then
the Click command. SIGTERM and SIGHUP stop a run the way Ctrl-C does (an exception where the
program is), so temporary outputs are removed and nothing partial is left; the command modules
are imported only after that, so an interrupt during start-up gives no traceback either."""
from __future__ import annotations

import signal
import sys

_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _stop(signum, frame):
    from .errors import Terminated
    for s in _STOP_SIGNALS:  # one stop is enough: a second signal must not cut the clean-up short
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def main() -> None:
    for s in _STOP_SIGNALS:
        signal.signal(s, _stop)
    code = 0
    try:
        from .cli import main as command
        command(prog_name="rwkvtools")
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt as e:  # before the command took over (imports, start-up)
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print("\nAborted!" if signum == signal.SIGINT else f"\nerror: stopped by {name}", file=sys.stderr)
        code = 128 + signum
    finally:
        # the run is over (its outputs published or removed): a late Ctrl-C or SIGTERM during the
        # interpreter's shutdown must not print a traceback from an exit handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    sys.exit(code)
