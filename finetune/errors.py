"""The one exception type for bad user input: the CLI turns it into one line on stderr and exit 2."""


class FinetuneError(Exception):
    """A problem with the user's recipe, data or command line, with a message that says how to fix it."""
