"""The Data Backbone: put, get and query datasets by type and data id.

::

    from dmstream.backbone import Backbone

    backbone = Backbone.from_settings()
    backbone.ingest_raw("night/raw/.../raw.fits")
    backbone.put(calexp, "calexp", instrument="LSSTCam", day_obs=20261209, visit=2026120900012,
                 detector=94, band="r")
    calexp = backbone.get("calexp", instrument="LSSTCam", day_obs=20261209, visit=2026120900012,
                          detector=94)
    refs = backbone.query("raw", day_obs=20261209, detector=94)

Every dataset is written once: putting it again is a no-op when the content
is the same and a :class:`DatasetConflictError` when it differs.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dmstream.backbone.datastore import Datastore
from dmstream.backbone.formatters import FORMATTERS, FormatterError
from dmstream.backbone.registry import (
    DatasetNotFoundError,
    DatasetRef,
    DatasetType,
    Registry,
    check_same_content,
)
from dmstream.settings import Settings, load
from dmstream.streams.rawfits import RawFileError


class Backbone:
    """A dataset registry in SQL and the files it points to.

    Parameters
    ----------
    registry_url : str
        SQLAlchemy URL of the registry (SQLite file or PostgreSQL).
    root : path-like
        Root of the datastore; every process sharing a registry must see the same files here.
    """

    def __init__(self, registry_url: str, root: str | os.PathLike[str]) -> None:
        self.registry = Registry(registry_url)
        self.datastore = Datastore(root)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Backbone:
        """The backbone at ``DMSTREAM_REGISTRY_URL`` and ``DMSTREAM_BACKBONE_ROOT`` (in the data dir)."""
        settings = settings or load()
        return cls(settings.registry_url, settings.backbone_root)

    def close(self) -> None:
        self.registry.close()

    def register_type(self, name: str, dimensions: tuple[str, ...], storage: str,
                      implied: tuple[str, ...] = (), description: str = "") -> DatasetType:
        """Register a new dataset type (a no-op if it exists with the same definition).

        Parameters
        ----------
        name : str
        dimensions : tuple of str
            Identifying dimensions, from :data:`~dmstream.backbone.registry.DIMENSIONS`.
        storage : str
            A key of :data:`~dmstream.backbone.formatters.FORMATTERS`.
        implied : tuple of str
            Dimensions recorded and queryable but not identifying.
        description : str
        """
        if storage not in FORMATTERS:
            raise FormatterError(f"no storage class {storage!r}; known: {', '.join(FORMATTERS)}")
        return self.registry.register(DatasetType(name, dimensions, storage, implied, description))

    def types(self) -> list[DatasetType]:
        """Every registered dataset type."""
        return self.registry.dataset_types()

    def counts(self) -> dict[str, int]:
        """Number of datasets of each registered type."""
        return self.registry.counts()

    def put(self, obj: Any, dataset_type: str, *, provenance: str = "", **data_id: Any) -> DatasetRef:
        """Store ``obj`` as the dataset of this type and data id.

        Returns
        -------
        DatasetRef
            The new ref, or the existing one if the same content was already stored.

        Raises
        ------
        DataIdError
            If the data id does not fit the type.
        FormatterError
            If the type cannot store ``obj``.
        DatasetConflictError
            If another content is stored under this data id.
        """
        kind = self.registry.dataset_type(dataset_type)
        data_id = kind.normalize(data_id)
        formatter = FORMATTERS[kind.storage]
        relative = self.datastore.relative_path(kind, data_id, formatter.extension)
        staged = self.datastore.stage(formatter, obj, relative)
        try:
            existing = self.registry.find(kind, data_id)
            if existing is not None:
                check_same_content(existing, staged.checksum)
                return existing
            ref = DatasetRef(kind.name, data_id, relative, staged.size, staged.checksum, datetime.now(UTC),
                             provenance)
            return self.registry.add(ref, staged.publish)
        finally:
            staged.discard()

    def ref(self, dataset_type: str, **data_id: Any) -> DatasetRef:
        """The ref of one dataset.

        Raises
        ------
        DatasetNotFoundError
            If there is none (implied dimensions given must match too).
        """
        kind = self.registry.dataset_type(dataset_type)
        data_id = kind.normalize(data_id)
        ref = self.registry.find(kind, data_id)
        if ref is None or any(ref.data_id.get(name) != value for name, value in data_id.items()):
            raise DatasetNotFoundError(f"no {dataset_type} {kind.key(data_id)} in the backbone")
        return ref

    def get(self, dataset_type: str, *, verify: bool = False, section: tuple[slice, slice] | None = None,
            **data_id: Any) -> Any:
        """Read one dataset.

        Parameters
        ----------
        verify : bool
            Check the file's SHA-256 against the registry first (reads the file twice).
        section : tuple of slice, optional
            For images (``ccd_image``): read only these (rows, cols).

        Raises
        ------
        DatasetNotFoundError
        CorruptDatasetError
            If the file is missing, unreadable or, with ``verify``, does not match its checksum.
        """
        ref = self.ref(dataset_type, **data_id)
        formatter = FORMATTERS[self.registry.dataset_type(dataset_type).storage]
        options = {} if section is None else {"section": section}
        return self.datastore.read(formatter, ref.path, ref.checksum if verify else None, **options)

    def path(self, dataset_type: str, **data_id: Any) -> Path:
        """The absolute path of one dataset's file, for readers that open it themselves."""
        return self.datastore.absolute(self.ref(dataset_type, **data_id).path)

    def exists(self, dataset_type: str, **data_id: Any) -> bool:
        try:
            self.ref(dataset_type, **data_id)
        except DatasetNotFoundError:
            return False
        return True

    def query(self, dataset_type: str, **where: Any) -> list[DatasetRef]:
        """Datasets of a type matching a partial data id, sorted by data id."""
        kind = self.registry.dataset_type(dataset_type)
        return self.registry.query(kind, kind.normalize(where, complete=False))

    def find_calibration(self, dataset_type: str, day_obs: int, **data_id: Any) -> DatasetRef:
        """The latest calibration of this type made for ``day_obs`` or before.

        Parameters
        ----------
        dataset_type : str
            bias, dark, flat, defects, crosstalk (any type with a day_obs dimension).
        day_obs : int
            The observing day the calibration is for.
        **data_id
            The rest of the data id (instrument, detector, band for flats).
        """
        kind = self.registry.dataset_type(dataset_type)
        if "day_obs" not in kind.dimensions:
            raise DatasetNotFoundError(f"{dataset_type} has no day_obs: it is not a calibration")
        refs = self.registry.query(kind, kind.normalize(data_id, complete=False), before_day_obs=int(day_obs))
        if not refs:
            raise DatasetNotFoundError(f"no {dataset_type} {data_id} made on or before day_obs {day_obs}")
        return max(refs, key=lambda ref: ref.data_id["day_obs"])

    def ingest_raw(self, path: str | os.PathLike[str], provenance: str = "") -> DatasetRef:
        """Copy a raw file into the backbone under the data id of its primary header.

        Ingesting the same file twice is a no-op.  The data id: ``instrument``
        (INSTRUME), ``day_obs`` (DAYOBS), ``exposure`` (DAYOBS * 100000 +
        SEQNUM), ``detector`` (DETECTOR), and implied ``band`` (FILTBAND) and
        ``physical_filter`` (FILTER).

        Raises
        ------
        RawFileError
            If the file is not a readable raw (checked with
            :func:`~dmstream.streams.rawfits.read_raw`: all 16 amplifiers and their sections).
        """
        from dmstream.streams.observatory import exposure_id_of
        from dmstream.streams.rawfits import read_raw

        header = read_raw(path).primary_header
        try:
            data_id = {"instrument": header["INSTRUME"], "day_obs": int(header["DAYOBS"]),
                       "exposure": exposure_id_of(int(header["DAYOBS"]), int(header["SEQNUM"])),
                       "detector": int(header["DETECTOR"]), "band": header["FILTBAND"],
                       "physical_filter": header["FILTER"]}
        except (KeyError, ValueError) as exc:
            raise RawFileError(f"{path}: the primary header gives no data id: {exc}") from None
        provenance = provenance or f"ingest_raw {Path(path).name}"
        return self.put(Path(path), "raw", provenance=provenance, **data_id)

