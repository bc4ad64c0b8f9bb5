"""The base class of every error a user can cause.

``LipdeqError`` marks faults in what a user gave the library (a configuration, a data file, a
checkpoint, a run directory, a model that is not a contraction): the command line prints those as
one line naming the problem and exits 2. Anything else (a programming error, an out-of-memory
``RuntimeError``) is not a ``LipdeqError`` and keeps its traceback.

Each subclass also derives from ``ValueError`` (or ``RuntimeError``) where code that predates this
base class caught that; new code should catch ``LipdeqError`` or the specific subclass.
"""

from __future__ import annotations

__all__ = ["LipdeqError"]


class LipdeqError(Exception):
    """A fault in the user's input or environment, with a message that names the problem."""
