"""Kura's content-addressed store: the driver interface and its filesystem driver."""

from .driver import BlobContent, Collection, RepositorySnapshot, Stamped, StorageDriver, StoredBlob, UploadInfo, UploadQuota
from .errors import (
    BlobNotFound,
    DigestMismatch,
    ManifestNotFound,
    ManifestReferenceUnknown,
    QuotaExceeded,
    RangeMismatch,
    RepositoryBusy,
    SizeMismatch,
    StorageError,
    StorageFull,
    StoreUnavailable,
    TooLarge,
    TooManyUploads,
    UploadBusy,
    UploadNotFound,
)
from .filesystem import FilesystemDriver

__all__ = [
    "manifests", "BlobContent", "StorageDriver", "UploadInfo", "UploadQuota", "FilesystemDriver",
    "Collection", "RepositorySnapshot", "Stamped", "StoredBlob",
    "StorageError", "StorageFull", "StoreUnavailable", "BlobNotFound", "DigestMismatch", "ManifestNotFound", "ManifestReferenceUnknown", "RangeMismatch", "SizeMismatch",
    "TooLarge", "TooManyUploads", "UploadBusy", "UploadNotFound", "RepositoryBusy", "QuotaExceeded", "usage",
]
from . import manifests, usage  # noqa: E402 - after the names they use
