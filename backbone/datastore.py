"""The file datastore of the Data Backbone: where each dataset's file lives, written atomically.

Layout under the root (``<data dir>/backbone/files`` by default)::

    <type>/<day_obs>/<type>_<value>_<value>....<ext>    types identified by a day_obs
    <type>/<type>_<value>_<value>....<ext>              the others (templates: sky tile and band)

with the key dimension values, day_obs left out, in the order of the type's
dimensions: ``raw/20261209/raw_LSSTCam_2026120900012_94.fits``.

A file is first written beside its final place under a hidden temporary
name, its size and SHA-256 taken, and only renamed into place once the
registry has accepted it (:class:`StagedFile`), so a reader never sees half a
file and a crash leaves at most a temporary file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmstream.backbone.formatters import Formatter
from dmstream.backbone.registry import BackboneError, DatasetType


class CorruptDatasetError(BackboneError):
    """A dataset's file is missing, does not match its checksum, or cannot be read."""


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, hex."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@dataclass
class StagedFile:
    """A file written under a temporary name, waiting to be published at ``final``."""

    temporary: Path
    final: Path
    size: int
    checksum: str

    def publish(self) -> None:
        """Rename the file into place (atomic on one filesystem)."""
        os.replace(self.temporary, self.final)

    def discard(self) -> None:
        """Remove the temporary file if it was not published."""
        with contextlib.suppress(FileNotFoundError):
            self.temporary.unlink()


class Datastore:
    """Files of datasets under ``root``.

    Parameters
    ----------
    root : path-like
        Created if missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def relative_path(dataset_type: DatasetType, data_id: dict[str, Any], extension: str) -> str:
        """The path of a dataset's file relative to the root, ``/``-separated."""
        values = [str(data_id[name]) for name in dataset_type.dimensions if name != "day_obs"]
        name = "_".join([dataset_type.name, *values]) + extension
        if "day_obs" in dataset_type.dimensions:
            return f"{dataset_type.name}/{data_id['day_obs']}/{name}"
        return f"{dataset_type.name}/{name}"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def stage(self, formatter: Formatter, obj: Any, relative: str) -> StagedFile:
        """Write ``obj`` to a temporary file beside ``relative``; take its size and checksum."""
        final = self.absolute(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        try:
            formatter.write(obj, temporary)
            with open(temporary, "rb+") as stream:
                os.fsync(stream.fileno())
            return StagedFile(temporary, final, temporary.stat().st_size, sha256_of(temporary))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise

    def read(self, formatter: Formatter, relative: str, checksum: str | None = None, **options: Any) -> Any:
        """Read a dataset's file; with ``checksum``, verify it first; ``options`` go to the formatter.

        Raises
        ------
        CorruptDatasetError
            If the file is missing, its SHA-256 differs from ``checksum``, or the formatter cannot read it.
        """
        path = self.absolute(relative)
        if not path.is_file():
            raise CorruptDatasetError(f"{path} is missing from the datastore")
        if checksum is not None:
            actual = sha256_of(path)
            if actual != checksum:
                raise CorruptDatasetError(f"{path} is corrupt: sha256 {actual}, registered {checksum}")
        try:
            with warnings.catch_warnings():
                # astropy only warns about a file shorter than its headers say.
                warnings.filterwarnings("error", message=".*truncated")
                return formatter.read(path, **options)
        except (OSError, ValueError, KeyError, TypeError, IndexError, Warning) as exc:
            raise CorruptDatasetError(f"{path} cannot be read as {formatter.storage}: {exc}") from exc
