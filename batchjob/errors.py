"""Errors batchjob raises on purpose. Every message names the thing at fault."""

import sys

# What json.loads's plain ValueError (not a JSONDecodeError) means: a number it would not
# convert, past sys.get_int_max_str_digits() (a guard against quadratic-time parsing).
HUGE_NUMBER = f"a number of more than {sys.get_int_max_str_digits()} digits"


class BatchJobError(Exception):
    """Base of every error batchjob raises on purpose."""


class UsageError(BatchJobError):
    """A bad invocation or job spec: the CLI prints it on one line and exits 2."""


class InputError(BatchJobError):
    """A bad record or request: not retryable, it becomes an error row or a 4xx."""


class StorageError(BatchJobError):
    """Reading or writing storage failed: retryable."""


class ReplicaError(BatchJobError):
    """A model replica failed to start, died too often, or failed a batch."""
