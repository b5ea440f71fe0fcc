"""The one exception type for mistakes a user can fix (bad flag, bad file, bad config).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A clear, one-sentence error about user input: names the file, line or field and what was expected."""


class StepError(UserError):
    """A user's code or data failed inside a training step (a reward function that raised, say): the trainer saves
    a checkpoint of the last finished step, then stops with this line, so nothing is lost."""


# The name on the package index: `minimind` there is another project. The import name and the command stay
# `minimind`.
DISTRIBUTION = "minimind-llm"


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, from the package index and from a clone."""
    return f"pip install '{DISTRIBUTION}[{extra}]' (from a clone: pip install -e '.[{extra}]')"
