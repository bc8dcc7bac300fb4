"""The one exception type users see for bad input."""


class EmalignError(ValueError):
    """Bad input or an unusable output location; the message is one line naming the path and the problem."""
