"""Raw FITS files of LSSTCam detectors: writing and reading the layout of ``docs/raw-format.md``.

One file per detector per exposure: a primary HDU with the exposure's header
and an approximate TAN WCS of the assembled detector, then the 16 amplifiers
as int32 image extensions in readout orientation (``Segment10`` …
``Segment17``, ``Segment07`` … ``Segment00``).  Files are written atomically
(a temporary file renamed into place) and byte-for-byte reproducibly: nothing
in them depends on when they were written.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning

from dmstream.payloads.camera import (
    AMPLIFIERS_PER_DETECTOR,
    AmplifierLayout,
    DetectorGeometry,
    assemble,
    detector_wcs,
    get_detector,
    parse_section,
)

if TYPE_CHECKING:
    from dmstream.streams.readout import DetectorReadout

INSTRUMENT = "LSSTCam"
TELESCOPE = "Simonyi Survey Telescope"
#: Keywords the caller of :func:`write_raw` must give.
REQUIRED_KEYWORDS = ("OBSID", "DAYOBS", "SEQNUM", "GROUPID", "IMGTYPE", "EXPTIME", "DARKTIME",
                     "MJD-OBS", "FILTBAND", "RA", "DEC", "ROTPA")
#: Keywords :func:`write_raw` derives from the detector and the pointing; callers may not set them.
DERIVED_KEYWORDS = ("INSTRUME", "TELESCOP", "DETECTOR", "DETNAME", "RAFTBAY", "CCDSLOT", "CCD_MANU",
                    "DETSIZE", "TIMESYS", "WCSAXES", "CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1",
                    "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "RADESYS", "EQUINOX")
_COMMENTS = {
    "INSTRUME": "instrument", "OBSID": "observation id",
    "DAYOBS": "observing day, YYYYMMDD", "SEQNUM": "sequence number of the exposure in its day",
    "GROUPID": "group (visit) id", "IMGTYPE": "BIAS, DARK, FLAT or OBJECT",
    "DETECTOR": "detector id", "DETNAME": "raft and sensor", "RAFTBAY": "raft", "CCDSLOT": "sensor",
    "CCD_MANU": "sensor vendor", "DETSIZE": "assembled detector",
    "EXPTIME": "[s] open-shutter time", "DARKTIME": "[s] time from clear to readout",
    "TIMESYS": "time scale of DATE-* and MJD-*", "DATE-OBS": "start of the exposure",
    "MJD-OBS": "[d] start of the exposure", "MJD-BEG": "[d] start of the exposure",
    "MJD-END": "[d] end of the exposure", "FILTER": "filter in the beam", "FILTBAND": "band",
    "RA": "[deg] boresight right ascension, ICRS", "DEC": "[deg] boresight declination, ICRS",
    "ROTPA": "[deg] position angle of focal-plane +y, E of N",
}
_ADC_TYPES = (np.int16, np.int32, np.uint16)


class RawFileError(ValueError):
    """A file that is not a complete, valid raw file: unreadable, truncated, or with wrong extensions."""


@dataclass
class RawExposure:
    """A raw file as read back.

    Attributes
    ----------
    path : pathlib.Path
    primary_header : astropy.io.fits.Header
    detector : DetectorGeometry
    amp_headers : list of astropy.io.fits.Header
        The 16 amplifier extension headers in file order.
    amps : list of numpy.ndarray
        The 16 amplifiers, native int32, readout orientation, ADU.
    """

    path: Path
    primary_header: fits.Header
    detector: DetectorGeometry
    amp_headers: list[fits.Header]
    amps: list[np.ndarray]

    def amplifiers(self) -> list[tuple[fits.Header, np.ndarray]]:
        """(header, pixels) of each amplifier in file order."""
        return list(zip(self.amp_headers, self.amps, strict=True))

    def assemble(self) -> np.ndarray:
        """Data sections of the amplifiers assembled into the detector (int32, no bias subtraction)."""
        return assemble(self.amps, self.detector)

    def wcs(self) -> WCS:
        """The approximate TAN WCS of the assembled detector from the primary header."""
        with warnings.catch_warnings():
            # The primary HDU has no pixels (NAXIS = 0), which astropy points out.
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(self.primary_header)


def amplifier_header(amp: AmplifierLayout, detector: DetectorGeometry) -> fits.Header:
    """The extension header of one amplifier (EXTNAME, sections, IRAF coordinate keywords)."""
    x0, y0, x1, y1 = amp.bbox
    # DTM/DTV map raw-array pixel coordinates (1-based) to the assembled
    # detector: det = DTM * raw + DTV.
    dtm1 = -1 if amp.flip_x else 1
    dtm2 = -1 if amp.flip_y else 1
    dtv1 = (x1 + amp.prescan + 1) if amp.flip_x else (x0 - amp.prescan)
    dtv2 = (y1 + 1) if amp.flip_y else y0
    return fits.Header([
        ("EXTNAME", amp.name, "amplifier (segment)"),
        ("CHANNEL", amp.index + 1, "position in the readout"),
        ("BUNIT", "adu"),
        ("DATASEC", amp.datasec, "image data in this array"),
        ("BIASSEC", amp.biassec, "serial overscan of the data rows"),
        ("DETSEC", amp.detsec, "DATASEC in the assembled detector"),
        ("DETSIZE", detector.detsize, "assembled detector"),
        ("LTV1", -amp.prescan, "data-section x = raw x + LTV1"),
        ("LTV2", 0, "data-section y = raw y + LTV2"),
        ("LTM1_1", 1.0),
        ("LTM2_2", 1.0),
        ("DTV1", dtv1, "detector x = DTM1_1 * raw x + DTV1"),
        ("DTV2", dtv2, "detector y = DTM2_2 * raw y + DTV2"),
        ("DTM1_1", float(dtm1)),
        ("DTM2_2", float(dtm2)),
        ("DTM1_2", 0.0),
        ("DTM2_1", 0.0),
    ])


def primary_header(header_values: Mapping[str, Any], detector: DetectorGeometry) -> fits.Header:
    """The primary header of a raw file: exposure keywords, detector keywords, WCS.

    Parameters
    ----------
    header_values : mapping
        At least :data:`REQUIRED_KEYWORDS`; optionally FILTER (default FILTBAND),
        MJD-BEG (default MJD-OBS), MJD-END (default MJD-BEG + EXPTIME),
        DATE-OBS (default from MJD-OBS) and any other keyword, written after the
        standard ones in the order given.
    detector : DetectorGeometry
    """
    missing = [key for key in REQUIRED_KEYWORDS if key not in header_values]
    if missing:
        raise ValueError(f"raw header lacks {', '.join(missing)}")
    clashing = [key for key in DERIVED_KEYWORDS if key in header_values]
    if clashing:
        raise ValueError(f"raw header keywords {', '.join(clashing)} come from the detector and pointing")
    values = dict(header_values)
    exptime = float(values["EXPTIME"])
    mjd_beg = float(values.get("MJD-BEG", values["MJD-OBS"]))
    values.setdefault("MJD-BEG", mjd_beg)
    values.setdefault("MJD-END", mjd_beg + exptime / 86400.0)
    values.setdefault("DATE-OBS", Time(float(values["MJD-OBS"]), format="mjd", scale="tai").isot)
    values.setdefault("FILTER", values["FILTBAND"])
    standard = {
        "INSTRUME": INSTRUMENT, "TELESCOP": TELESCOPE,
        "OBSID": str(values.pop("OBSID")), "DAYOBS": int(values.pop("DAYOBS")),
        "SEQNUM": int(values.pop("SEQNUM")), "GROUPID": str(values.pop("GROUPID")),
        "IMGTYPE": str(values.pop("IMGTYPE")),
        "DETECTOR": detector.id, "DETNAME": detector.name, "RAFTBAY": detector.raft,
        "CCDSLOT": detector.sensor, "CCD_MANU": detector.vendor, "DETSIZE": detector.detsize,
        "EXPTIME": exptime, "DARKTIME": float(values.pop("DARKTIME")), "TIMESYS": "TAI",
        "DATE-OBS": str(values.pop("DATE-OBS")), "MJD-OBS": float(values.pop("MJD-OBS")),
        "MJD-BEG": float(values.pop("MJD-BEG")), "MJD-END": float(values.pop("MJD-END")),
        "FILTER": str(values.pop("FILTER")), "FILTBAND": str(values.pop("FILTBAND")),
        "RA": float(values.pop("RA")), "DEC": float(values.pop("DEC")), "ROTPA": float(values.pop("ROTPA")),
    }
    header = fits.Header()
    for key, value in standard.items():
        header[key] = (value, _COMMENTS.get(key, ""))
    for key, value in values.items():
        header[key] = value
    wcs = detector_wcs(detector, standard["RA"], standard["DEC"], standard["ROTPA"])
    header["WCSAXES"] = (2, "approximate TAN WCS of the assembled detector")
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRPIX1"], header["CRPIX2"] = (float(v) for v in wcs.wcs.crpix)
    header["CRVAL1"], header["CRVAL2"] = (float(v) for v in wcs.wcs.crval)
    (header["CD1_1"], header["CD1_2"]), (header["CD2_1"], header["CD2_2"]) = wcs.wcs.cd.tolist()
    header["RADESYS"], header["EQUINOX"] = "ICRS", 2000.0
    return header


def _write_atomic(path: Path, hdus: fits.HDUList) -> Path:
    """Write ``hdus`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as stream:
            hdus.writeto(stream, output_verify="exception")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return path


def write_raw(path: str | os.PathLike[str], header_values: Mapping[str, Any], amps: Sequence[np.ndarray],
              detector: DetectorGeometry, compress: bool = False) -> Path:
    """Write one detector's raw file atomically.

    Parameters
    ----------
    path : path-like
        Destination; its directory is created if needed.
    header_values : mapping
        Exposure keywords, see :func:`primary_header`.
    amps : sequence of numpy.ndarray
        The 16 integer amplifier arrays in raw-file order (as :func:`simulate_raw` returns them), ADU.
    detector : DetectorGeometry
    compress : bool
        Store the amplifiers as RICE_1 tile-compressed extensions (lossless for
        integers, ~3x smaller, slower to write).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    if len(amps) != AMPLIFIERS_PER_DETECTOR:
        raise ValueError(f"{detector.name}: {len(amps)} amplifier arrays, expected 16")
    hdus: list[fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU] = [
        fits.PrimaryHDU(header=primary_header(header_values, detector))]
    for amp, pixels in zip(detector.amplifiers, amps, strict=True):
        if pixels.shape != amp.raw_shape or pixels.dtype.type not in _ADC_TYPES:
            raise ValueError(f"{detector.name} {amp.name}: {pixels.dtype} {pixels.shape}, "
                             f"expected int32 {amp.raw_shape}")
        data = pixels.astype(np.int32, copy=False)
        header = amplifier_header(amp, detector)
        if compress:
            hdus.append(fits.CompImageHDU(data=data, header=header, compression_type="RICE_1",
                                          tile_shape=(1, amp.raw_shape[1])))
        else:
            hdus.append(fits.ImageHDU(data=data, header=header))
    return _write_atomic(Path(path), fits.HDUList(hdus))


def write_readout(path: str | os.PathLike[str], readout: DetectorReadout) -> Path:
    """Write a detector readout gathered from Kafka back into its raw file, atomically and unchanged."""
    return _write_atomic(Path(path), readout.hdu_list())


def _check_amplifier(hdu: Any, amp: AmplifierLayout) -> None:
    header = hdu.header
    if header.get("EXTNAME") != amp.name:
        raise RawFileError(f"extension {amp.index + 1} is {header.get('EXTNAME')!r}, expected {amp.name}")
    if hdu.shape != amp.raw_shape:
        raise RawFileError(f"{amp.name}: shape {hdu.shape}, expected {amp.raw_shape}")
    for key, expected in (("DATASEC", amp.datasec), ("BIASSEC", amp.biassec), ("DETSEC", amp.detsec)):
        try:
            section = parse_section(str(header.get(key, "")))
        except ValueError as exc:
            raise RawFileError(f"{amp.name}: {key} {exc}") from None
        if section != parse_section(expected):
            raise RawFileError(f"{amp.name}: {key} {header.get(key)}, expected {expected}")


def read_raw(path: str | os.PathLike[str]) -> RawExposure:
    """Read and check a raw file.

    Raises
    ------
    RawFileError
        If the file is missing, unreadable or truncated, names no known
        detector, or lacks any of the 16 amplifier extensions with the expected
        names, shapes, integer pixels and sections.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # astropy only warns about a file shorter than its headers promise.
            warnings.filterwarnings("error", message=".*truncated")
            warnings.filterwarnings("error", message="Error validating header")
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdus:
                if len(hdus) < 1 + AMPLIFIERS_PER_DETECTOR:
                    raise RawFileError(f"{len(hdus) - 1} extensions, expected {AMPLIFIERS_PER_DETECTOR}")
                primary = hdus[0].header.copy()
                try:
                    detector = get_detector(str(primary["DETNAME"]))
                except KeyError as exc:
                    raise RawFileError(f"no known detector: {exc}") from None
                if primary.get("DETECTOR") != detector.id:
                    raise RawFileError(f"DETECTOR {primary.get('DETECTOR')} is not {detector.name}")
                headers, amps = [], []
                for amp, hdu in zip(detector.amplifiers, hdus[1:], strict=False):
                    _check_amplifier(hdu, amp)
                    data = hdu.data
                    if data is None or data.dtype.kind not in "iu":
                        raise RawFileError(f"{amp.name}: pixels are not integers")
                    headers.append(hdu.header.copy())
                    amps.append(np.asarray(data, dtype=np.int32))
    except RawFileError as exc:
        raise RawFileError(f"{path}: {exc}") from None
    except (OSError, ValueError, TypeError, IndexError, KeyError, Warning) as exc:
        raise RawFileError(f"{path}: not a readable raw file: {exc}") from exc
    return RawExposure(path=path, primary_header=primary, detector=detector, amp_headers=headers, amps=amps)
