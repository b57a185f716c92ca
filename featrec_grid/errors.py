"""The one exception type a user can cause and fix; the CLI turns it into exit code 2."""


class UserError(Exception):
    """Bad input (spec, file, shard, resources): the message names file, field, value and what is allowed."""


def first_line(err: BaseException) -> str:
    """`Type: last line of the message`: how a failed task is named in summaries (the last line of a chained
    or multi-line error is the one that says what went wrong)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"
