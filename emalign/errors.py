"""The one exception type users see for bad input, and the warning for reading an unfinished output."""


class EmalignError(ValueError):
    """Bad input or an unusable output location; the message is one line naming the path and the problem."""


class IncompleteOutputWarning(UserWarning):
    """An emalign output (alignment or import) is read before its run has finished: unwritten sections are zeros."""
