"""Stage one's refusals of bad input (a task, a model, data files): a UserError, printed as one line."""
from cache_store.errors import UserError


class InputError(UserError):
    """Bad input from the user: the message names the problem and the fix."""
