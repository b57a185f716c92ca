"""The one exception type a user can cause and fix; the CLI turns it into exit code 2."""


class UserError(Exception):
    """Bad input (spec, file, shard, resources): the message names file, field, value and what is allowed."""
