"""The one exception type users see. Its message is a single line that names the fix."""


class DomainpruneError(Exception):
    """Bad input or an unsatisfiable request. The CLI prints `error: <message>` and exits with status 2."""
