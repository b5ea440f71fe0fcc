"""The one exception type for mistakes a user can fix (bad flag, bad file, bad config).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A clear, one-sentence error about user input: names the file, line or field and what was expected."""
