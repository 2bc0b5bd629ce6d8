"""How each storage class of the Data Backbone is written to a file and read back.

=============  ==========  ===================================================
storage        extension   Python object
=============  ==========  ===================================================
``raw``        ``.fits``   written from FITS bytes, a path to copy or an
                           ``HDUList``; read as :class:`~dmstream.streams.rawfits.RawExposure`
``ccd_image``  ``.fits``   :class:`~dmstream.payloads.image.CcdImage`
``images``     ``.fits``   a numpy array, or a mapping of names to arrays
``parquet``    ``.parquet`` a pyarrow Table
``json``       ``.json``   a JSON-able dict
=============  ==========  ===================================================

The FITS layouts are described in ``docs/backbone.md``.  Floating-point header
values are written with all 17 significant digits (free-format cards), so a
CcdImage comes back with the same pixels, mask, WCS, band, exposure time,
zero point and metadata.  Nothing written depends on the time of writing, so
the same object always gives the same bytes and the same checksum.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.wcs import WCS, WCSHDO_P17, FITSFixedWarning, WCSHDO_all
from astropy.wcs.wcs import WCSHDO_SIP

from dmstream.backbone.registry import BackboneError
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MASK_DTYPE, MaskPlane
from dmstream.payloads.psf import PixelPsf, auto_stamp_size
from dmstream.streams.rawfits import read_raw

#: Version of the CcdImage layout, in the primary header as ``DMSFVER``.
CCD_IMAGE_FORMAT_VERSION = 1
_FITS_SIGNATURE = b"SIMPLE  ="


class FormatterError(BackboneError, TypeError):
    """An object its dataset type cannot store (wrong type, or a value FITS cannot hold)."""


def _exact_card(keyword: str, value: Any, comment: str = "") -> fits.Card:
    """A header card; a float keeps every digit (FITS free format), which astropy's own cards do not."""
    if isinstance(value, float | np.floating) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise FormatterError(f"{keyword} is {value}: FITS headers hold finite numbers only")
        image = f"{keyword:<8}= {repr(float(value)).upper():>20}"
        if comment:
            image = f"{image} / {comment}"
        return fits.Card.fromstring(image[:80])
    return fits.Card(keyword, value.item() if isinstance(value, np.generic) else value, comment)


def _native(array: np.ndarray) -> np.ndarray:
    """A FITS (big-endian) array as a native-order copy that owns its memory."""
    return np.array(array, dtype=array.dtype.newbyteorder("="))


def _wcs_cards(wcs: WCS) -> list[fits.Card]:
    # P17: wcslib writes every digit; WCSHDO_SIP: astropy adds the SIP polynomials.
    header = wcs.to_header(relax=WCSHDO_all | WCSHDO_P17 | WCSHDO_SIP)
    return [_exact_card(card.keyword, card.value, card.comment) for card in header.cards]


def _read_wcs(header: fits.Header) -> WCS | None:
    if "WCSAXES" not in header:
        return None
    with warnings.catch_warnings():
        # astropy notes the keywords it fills in (MJDREF, ...); nothing is wrong with the file.
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


class Formatter:
    """Writes one kind of object to a file and reads it back."""

    storage: ClassVar[str]
    extension: ClassVar[str]

    def write(self, obj: Any, path: Path) -> None:
        raise NotImplementedError

    def read(self, path: Path) -> Any:
        raise NotImplementedError


class RawFormatter(Formatter):
    """Raw files are stored as the camera (or the archiver) wrote them, byte for byte."""

    storage = "raw"
    extension = ".fits"

    def write(self, obj: bytes | str | os.PathLike[str] | fits.HDUList, path: Path) -> None:
        if isinstance(obj, bytes | bytearray | memoryview):
            if bytes(obj[:len(_FITS_SIGNATURE)]) != _FITS_SIGNATURE:
                raise FormatterError("raw bytes do not start a FITS file")
            path.write_bytes(obj)
        elif isinstance(obj, str | os.PathLike):
            with open(obj, "rb") as source:
                if source.read(len(_FITS_SIGNATURE)) != _FITS_SIGNATURE:
                    raise FormatterError(f"{obj} is not a FITS file")
            shutil.copyfile(obj, path)
        elif isinstance(obj, fits.HDUList):
            obj.writeto(path, output_verify="exception")
        else:
            raise FormatterError(f"a raw is FITS bytes, a path or an HDUList, not {type(obj).__name__}")

    def read(self, path: Path) -> Any:
        return read_raw(path)


class CcdImageFormatter(Formatter):
    """A CcdImage as multi-extension FITS: IMAGE, VARIANCE, MASK and, if it has a PSF, PSF.

    The PSF: a :class:`~dmstream.payloads.psf.PixelPsf` is stored exactly; any
    other PSF model as its kernel at the image centre (a PixelPsf of degree 0),
    which is what is read back.
    """

    storage = "ccd_image"
    extension = ".fits"

    def write(self, obj: CcdImage, path: Path) -> None:
        if not isinstance(obj, CcdImage):
            raise FormatterError(f"expected a CcdImage, got {type(obj).__name__}")
        primary = fits.PrimaryHDU()
        header = primary.header
        header.append(_exact_card("DMSFORM", "CcdImage", "dmstream backbone storage class"))
        header.append(_exact_card("DMSFVER", CCD_IMAGE_FORMAT_VERSION, "layout version"))
        header.append(_exact_card("FILTBAND", obj.band, "band"))
        header.append(_exact_card("EXPTIME", float(obj.exptime), "[s] exposure time"))
        if obj.zero_point is not None:
            header.append(_exact_card("MAGZERO", float(obj.zero_point), "[mag] AB mag of 1 e- in EXPTIME"))
        try:
            header["METADATA"] = (json.dumps(obj.metadata, sort_keys=True, default=_json_scalar),
                                  "JSON of CcdImage.metadata")
        except (TypeError, ValueError) as exc:
            raise FormatterError(f"CcdImage metadata is not JSON-able: {exc}") from None
        wcs_cards = _wcs_cards(obj.wcs) if obj.wcs is not None else []
        hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [primary]
        for name, data, unit in (("IMAGE", obj.image, "electron"), ("VARIANCE", obj.variance, "electron2"),
                                 ("MASK", obj.mask, "")):
            hdu = fits.ImageHDU(data=data, name=name)
            if unit:
                hdu.header["BUNIT"] = unit
            hdu.header.extend(wcs_cards)
            hdus.append(hdu)
        # Rubin's afw convention: HIERARCH MP_<plane> = bit number.
        hdus[-1].header.extend([fits.Card(f"HIERARCH MP_{plane.name}", int(plane).bit_length() - 1)
                                for plane in MaskPlane])
        if obj.psf is not None:
            hdus.append(_psf_hdu(obj.psf, obj.shape))
        fits.HDUList(hdus).writeto(path, output_verify="exception")

    def read(self, path: Path, section: tuple[slice, slice] | None = None) -> CcdImage:
        """Read the image, or only its ``section`` (rows, cols): the pixels outside it are never loaded.

        A section keeps the PSF of the whole image (positions in its PSF stay
        those of the whole image's pixels) and records its origin in
        ``metadata["SECTION_ORIGIN"]`` as (row, col).
        """
        # Memory-mapped, so that a section touches only the pages of its rows; unscaled, because astropy
        # maps no unsigned (BZERO) plane.
        with fits.open(path, memmap=section is not None, do_not_scale_image_data=section is not None) as hdus:
            primary = hdus[0].header
            if primary.get("DMSFORM") != "CcdImage":
                raise FormatterError(f"{path} is not a CcdImage file (DMSFORM {primary.get('DMSFORM')!r})")
            metadata = json.loads(primary["METADATA"])
            names = ("IMAGE", "VARIANCE", "MASK")
            if section is None:
                planes = [_native(hdus[name].data) for name in names]
            else:
                planes = [_section(hdus[name], section) for name in names]
                metadata["SECTION_ORIGIN"] = [section[0].start or 0, section[1].start or 0]
            wcs = _read_wcs(hdus["IMAGE"].header)
            if wcs is not None and section is not None:
                wcs = wcs.slice(section)
            psf = _read_psf(hdus["PSF"]) if "PSF" in hdus else None
            mask = _remap_mask(planes[2], hdus["MASK"].header)
            return CcdImage(image=planes[0], variance=planes[1], mask=mask, wcs=wcs, psf=psf,
                            zero_point=primary.get("MAGZERO"), band=primary["FILTBAND"],
                            exptime=float(primary["EXPTIME"]), metadata=metadata)


def _section(hdu: fits.ImageHDU, section: tuple[slice, slice]) -> np.ndarray:
    """Rows and columns of an unscaled, memory-mapped image HDU, as native values (BZERO applied)."""
    values = _native(hdu.data[section])
    offset = hdu.header.get("BZERO", 0)
    if offset:
        # Unsigned integers are stored signed, offset by BZERO (2**31 for uint32); BSCALE is 1 for them.
        return (values.astype(np.int64) + int(offset)).astype(values.dtype.str.replace("i", "u"))
    return values


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-able")


def _psf_hdu(psf: Any, shape: tuple[int, int]) -> fits.ImageHDU:
    if isinstance(psf, PixelPsf):
        kind, coefficients, degree = "PixelPsf", psf.coefficients, psf.degree
        detector_shape = psf.detector_shape
    else:
        rows, cols = shape
        centre_x, centre_y = (cols - 1) / 2, (rows - 1) / 2
        size = auto_stamp_size(psf.fwhm(centre_x, centre_y))
        kind, degree, detector_shape = f"centre of {type(psf).__name__}", 0, shape
        coefficients = np.asarray(psf.kernel(centre_x, centre_y, size), dtype=np.float64)[None]
    hdu = fits.ImageHDU(data=np.asarray(coefficients, dtype=np.float64), name="PSF")
    hdu.header["PSFKIND"] = (kind, "PixelPsf, or the model sampled at the centre")
    hdu.header["PSFDEG"] = (int(degree), "polynomial degree in detector position")
    hdu.header["PSFROWS"] = (int(detector_shape[0]), "detector rows the polynomial spans")
    hdu.header["PSFCOLS"] = (int(detector_shape[1]), "detector columns the polynomial spans")
    return hdu


def _read_psf(hdu: fits.ImageHDU) -> PixelPsf:
    header = hdu.header
    return PixelPsf(coefficients=_native(hdu.data), degree=int(header["PSFDEG"]),
                    detector_shape=(int(header["PSFROWS"]), int(header["PSFCOLS"])))


def _remap_mask(mask: np.ndarray, header: fits.Header) -> np.ndarray:
    """The mask with its bits moved to today's :class:`MaskPlane` values (by plane name)."""
    stored = {key[3:]: int(header[key]) for key in header if key.startswith("MP_")}
    unknown = [name for name in stored if name not in MaskPlane.__members__]
    if unknown:
        raise FormatterError(f"mask planes {', '.join(unknown)} are not MaskPlane names")
    current = {name: int(MaskPlane[name]).bit_length() - 1 for name in stored}
    if stored == current:
        return mask.astype(MASK_DTYPE, copy=False)
    remapped = np.zeros(mask.shape, dtype=MASK_DTYPE)
    for name, bit in stored.items():
        remapped |= ((mask >> MASK_DTYPE(bit)) & MASK_DTYPE(1)) << MASK_DTYPE(current[name])
    return remapped


class ImagesFormatter(Formatter):
    """A numpy array (the primary HDU) or a mapping of names to arrays (one extension each).

    Boolean arrays are stored as uint8 with ``DMSBOOL = T`` and come back boolean.
    """

    storage = "images"
    extension = ".fits"

    def write(self, obj: np.ndarray | Mapping[str, np.ndarray], path: Path) -> None:
        if isinstance(obj, np.ndarray):
            hdus = [fits.PrimaryHDU(data=self._storable(obj, "array"))]
            hdus[0].header["DMSFORM"] = ("array", "dmstream backbone storage class")
            self._mark_boolean(hdus[0], obj)
        elif isinstance(obj, Mapping) and obj:
            primary = fits.PrimaryHDU()
            primary.header["DMSFORM"] = ("arrays", "dmstream backbone storage class")
            hdus = [primary]
            for name, array in obj.items():
                if not isinstance(name, str) or not name.isidentifier() or len(name) > 60:
                    raise FormatterError(f"array name {name!r}: a Python identifier of at most 60 characters")
                if not isinstance(array, np.ndarray):
                    raise FormatterError(f"{name} is a {type(array).__name__}, not a numpy array")
                hdu = fits.ImageHDU(data=self._storable(array, name), name=name.upper())
                hdu.header["DMSKEY"] = (name, "key of this array in the mapping")
                self._mark_boolean(hdu, array)
                hdus.append(hdu)
        else:
            raise FormatterError(f"expected a numpy array or a non-empty mapping of names to arrays, "
                                 f"got {type(obj).__name__}")
        fits.HDUList(hdus).writeto(path, output_verify="exception")

    @staticmethod
    def _storable(array: np.ndarray, name: str) -> np.ndarray:
        if array.ndim == 0 or array.dtype.kind not in "biuf":
            raise FormatterError(f"{name}: FITS holds arrays of booleans, integers or floats with at least "
                                 f"one axis, not {array.dtype} with shape {array.shape}")
        return array.view(np.uint8) if array.dtype == np.bool_ else array

    @staticmethod
    def _mark_boolean(hdu: fits.PrimaryHDU | fits.ImageHDU, array: np.ndarray) -> None:
        if array.dtype == np.bool_:
            hdu.header["DMSBOOL"] = (True, "boolean array stored as uint8")

    @staticmethod
    def _array(hdu: Any) -> np.ndarray:
        data = _native(hdu.data)
        return data.astype(np.bool_) if hdu.header.get("DMSBOOL") else data

    def read(self, path: Path) -> np.ndarray | dict[str, np.ndarray]:
        with fits.open(path, memmap=False) as hdus:
            if hdus[0].header.get("DMSFORM") == "array":
                return self._array(hdus[0])
            return {hdu.header["DMSKEY"]: self._array(hdu) for hdu in hdus[1:]}


class ParquetFormatter(Formatter):
    storage = "parquet"
    extension = ".parquet"

    def write(self, obj: pa.Table, path: Path) -> None:
        if not isinstance(obj, pa.Table):
            raise FormatterError(f"expected a pyarrow Table, got {type(obj).__name__}")
        pq.write_table(obj, path)

    def read(self, path: Path) -> pa.Table:
        return pq.read_table(path)


class JsonFormatter(Formatter):
    """A dict as strict JSON (no NaN), keys sorted."""

    storage = "json"
    extension = ".json"

    def write(self, obj: Mapping[str, Any], path: Path) -> None:
        if not isinstance(obj, Mapping):
            raise FormatterError(f"expected a dict, got {type(obj).__name__}")
        try:
            text = json.dumps(obj, sort_keys=True, allow_nan=False, default=_json_scalar)
        except (TypeError, ValueError) as exc:
            raise FormatterError(f"not JSON-able: {exc}") from None
        path.write_text(text + "\n", encoding="utf-8")

    def read(self, path: Path) -> dict[str, Any]:
        return json.loads(path.read_text(encoding="utf-8"))


#: Storage class name → its formatter.
FORMATTERS: dict[str, Formatter] = {
    formatter.storage: formatter
    for formatter in (RawFormatter(), CcdImageFormatter(), ImagesFormatter(), ParquetFormatter(),
                      JsonFormatter())
}
