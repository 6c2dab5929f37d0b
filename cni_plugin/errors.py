"""The project's error taxonomy: one base, a few kinds callers act on differently.

Every message says what went wrong *and* what to do about it. Code that raises undoes its
partial work first, so a caught error never means a half-applied change. Stdlib-only.
"""


class IstioCniError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(IstioCniError):
    """Bad input from an operator or a caller (flags, env, files). Not retryable as is."""


class NetnsError(IstioCniError):
    """A network namespace path is missing, not a namespace, or not allowed (the host's)."""


class NotRetryableError(IstioCniError):
    """A failure that repeating the same request will not fix (e.g. rule installation)."""


class RedirectionError(IstioCniError):
    """Installing or removing in-pod redirection failed; partial work has been undone."""


class ZtunnelUnavailableError(IstioCniError):
    """No ztunnel is connected, or it did not acknowledge in time. Retry later."""


class ZtunnelRejectedError(IstioCniError):
    """ztunnel answered an Add with a non-empty Ack.error (its message is the text)."""
