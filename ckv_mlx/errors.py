"""The one error type users see: a clear, one-line message saying what to do."""


class CKVError(Exception):
    """Bad input or an unsupported setup; the message is shown to the user as is."""
