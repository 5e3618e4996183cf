"""Domain errors of the store. The HTTP layer translates them into wire errors."""

import errno

# OS errors that mean the store's filesystem is full.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageError(Exception):
    pass


class BlobNotFound(StorageError):
    pass


class UploadNotFound(StorageError):
    pass


class UploadBusy(StorageError):
    """Another request holds the upload session."""


class TooManyUploads(StorageError):
    """Starting another upload session would exceed a cap on open sessions."""

    def __init__(self, scope: str, limit: int):
        super().__init__(f"too many open upload sessions for this {scope} (limit {limit})")
        self.scope = scope  # "user" or "repository"
        self.limit = limit


class RepositoryBusy(StorageError):
    """Another request held the repository's lock for too long."""


class StorageFull(StorageError):
    """The store's filesystem has no space (or quota) left for a write. The message says what
    was undone; nothing half-written is left behind."""


class RangeMismatch(StorageError):
    """A chunk did not start where the session ends."""

    def __init__(self, current_size: int):
        super().__init__(f"upload is at offset {current_size}")
        self.current_size = current_size


class DigestMismatch(StorageError):
    def __init__(self, expected: str, actual: str):
        super().__init__(f"digest mismatch: expected {expected}, computed {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(StorageError):
    def __init__(self, expected: int, actual: int):
        super().__init__(f"size mismatch: expected {expected} bytes, got {actual}")
        self.expected = expected
        self.actual = actual


class TooLarge(StorageError):
    def __init__(self, limit: int):
        super().__init__(f"content exceeds the limit of {limit} bytes")
        self.limit = limit


class ManifestReferenceUnknown(StorageError):
    """A manifest references blobs or child manifests the repository does not have."""

    def __init__(self, kind: str, digests: list[str]):
        super().__init__(f"unknown {kind}(s): {', '.join(digests)}")
        self.kind = kind  # "blob" or "manifest"
        self.digests = digests


class ManifestNotFound(StorageError):
    pass


class QuotaExceeded(StorageError):
    """Counting a blob would take a namespace's stored bytes past its quota."""

    def __init__(self, used: int, limit: int, size: int):
        super().__init__(f"{used} of {limit} bytes used, {size} more needed")
        self.used = used
        self.limit = limit
        self.size = size


class StoreUnavailable(StorageError):
    """The object store behind the driver failed or could not be reached; nothing was
    changed that the caller was told about. Worth retrying later."""
