"""The failures of shipping a model folder: each message names the cause, and the built folder is kept."""


class HubError(RuntimeError):
    """A user-facing failure of building, verifying or uploading a model folder."""


class VerificationError(HubError):
    """The built folder does not load in a fresh process, or its outputs differ from the source model's."""


class UploadError(HubError):
    """The Hub could not be reached or refused the upload; the local folder is complete and kept."""


__all__ = ["HubError", "VerificationError", "UploadError"]
