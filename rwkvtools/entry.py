"""The ``rwkvtools`` console command (and ``python -m rwkvtools``): signal handling first, then
the Click command. SIGTERM and SIGHUP stop a run the way Ctrl-C does (an exception where the
program is), so temporary outputs are removed and nothing partial is left. A signal that comes
while the command modules are imported (torch: a second or two) is held until the imports are
done, then stops the run the same way (raised inside torch's C import code it could be lost, or
leave a module half-imported). A signal the parent ignores (`nohup`: SIGHUP) stays ignored."""
from __future__ import annotations

import signal
import sys

_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_pending: list[int] = []   # signals that came while the command modules were being imported


def _stop(signum, frame):
    from .errors import Terminated
    raise Terminated(signum)


def _defer(signum, frame):
    """During start-up: remember the signal (an exception raised inside torch's C import code can
    be swallowed there, and the signal lost); it stops the run once the imports are done."""
    _pending.append(signum)


def main() -> None:
    handled = [s for s in (signal.SIGINT, *_STOP_SIGNALS)
               if signal.getsignal(s) is not signal.SIG_IGN]   # `nohup` (SIGHUP ignored) stays ignored
    for s in handled:
        signal.signal(s, _defer)
    code = 0
    try:
        from .cli import main as command
        for s in handled:
            signal.signal(s, _stop if s != signal.SIGINT else signal.default_int_handler)
        if _pending:
            from .errors import Terminated
            raise Terminated(_pending[0])
        command(prog_name="rwkvtools")
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt as e:  # before the command took over (start-up)
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print("\nAborted!" if signum == signal.SIGINT else f"\nerror: stopped by {name}", file=sys.stderr)
        code = 128 + signum
    finally:
        # the run is over (its outputs published or removed): a late Ctrl-C or SIGTERM during the
        # interpreter's shutdown must not print a traceback from an exit handler
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
    sys.exit(code)
