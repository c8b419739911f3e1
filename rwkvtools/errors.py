"""Typed errors. Everything a user can cause derives from RwkvToolsError; the CLI turns it into
a one-paragraph message and exit code 2, never a traceback."""


class RwkvToolsError(Exception):
    """A problem with the user's input (file, options), explained in the message."""


class FormatError(RwkvToolsError):
    """A file is not what it claims to be (bad magic, truncated, inconsistent header)."""


class UnsafeFileError(FormatError):
    """A file would need arbitrary code execution (a pickle with globals) to load."""


class SpecError(RwkvToolsError):
    """Tensor names/shapes do not match any known RWKV layout."""


class GateError(RwkvToolsError):
    """A validation gate failed (the report is still written)."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP): raised where the program is,
    like Ctrl-C, so every temporary output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
