"""The error a user's mistake raises.

Commands print a ``UserError`` as one line (``error: ...``) and exit with
status 2; any other exception is a bug of tim_jax and keeps its traceback.
It is a ``ValueError``, so library callers that catch bad input as
``ValueError`` keep working.
"""


class UserError(ValueError):
  """Bad input: a flag, a config field, a file. The message names it."""
