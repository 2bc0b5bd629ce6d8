"""Geometry of the LSSTCam focal plane: rafts, detectors, amplifiers, assembly and an approximate WCS.

Pure functions and small frozen classes on numpy arrays; no I/O.

Conventions
-----------
Arrays are indexed ``[row, column]`` = ``[y, x]``, 0-based; FITS section strings
(``DATASEC``, ``BIASSEC``, ``DETSEC``) are 1-based and inclusive, ``[x1:x2,y1:y2]``,
and a reversed range (``[509:1,...]``) says that the first pixel of the data
section lands at the high end of the range.

A *raw amplifier* array is in readout order: row 0 is the first row shifted
into the serial register, column 0 the first pixel read (the serial prescan).
Its columns are ``prescan | data | serial overscan`` and its rows
``data | parallel overscan``.  The *assembled detector* is in the orientation of
Rubin's camera geometry (obs_lsst ``cameraGeom``): amplifiers ``C10``..``C17``
(EXTNAME ``Segment10``..``Segment17``) form the top half from left to right,
``C00``..``C07`` the bottom half from left to right.  The camera team's own
DETSEC keywords in LSSTCam raws use a frame flipped in y with respect to this
one; ours describe the assembled detector defined here, so that the keywords
and :func:`assemble` always agree.

Facts and their sources (read from ``lsst/obs_lsst``, ``policy/`` and
``tests/``, April 2026):

- Science rafts ``Rrc`` (row r = y, column c = x, 0..4, corners excluded) sit on
  a 127 mm grid centred on R22; sensors ``Src`` on a 42.25 mm grid inside the
  raft centred on S11 (``policy/rafts.yaml``, ``policy/cameraHeader.yaml``).
  All science rafts and sensors have zero yaw in the nominal geometry.
- Detector ids: 9 consecutive ids per raft, rafts in the order R01, R02, R03,
  R10 … R14, R20 … R24, R30 … R34, R41, R42, R43 (ids 0-188; R22_S11 is 94),
  sensor index ``3 r + c`` (``policy/rafts.yaml`` ``id0``).
- Vendors: ITL rafts R01, R02, R03, R10, R20, R41, R42, R43; the other 13 are
  e2v (``detectorType`` in ``policy/lsstCam/R*.yaml``).
- Readout (``policy/cameraHeader.yaml`` and real LSSTCam headers in
  ``tests/headers``, ``ZNAXIS1 = 576`` for ITL too): every amplifier is read as
  576 x 2048 pixels.  ITL: 3 prescan, 509 data, 64 serial overscan columns;
  2000 data and 48 parallel overscan rows.  e2v: 10 prescan, 512 data, 54
  serial overscan columns; 2002 data and 46 parallel overscan rows.  (Older
  ITL simulations, imSim DC2, used 544 columns with 32 overscan; the whole
  focal plane is clocked together, so LSSTCam reads both vendors alike.)
- Flips from readout to assembled orientation: top row (C1x) flipped in x and
  y for both vendors; bottom row (C0x) flipped in x for ITL, not at all for e2v.
- Pixels are 10 µm; the plate scale is 20.006″/mm (``cameraTransforms.yaml``),
  which we round to 0.2″/px.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from astropy.wcs import WCS
from numpy.typing import DTypeLike

PIXEL_SIZE_MM = 0.010
PIXEL_SCALE_ARCSEC = 0.2
RAFT_PITCH_MM = 127.0
SENSOR_PITCH_MM = 42.25
CORNER_RAFTS = frozenset({"R00", "R04", "R40", "R44"})
#: The 21 science rafts in detector-id order.
SCIENCE_RAFTS = tuple(f"R{row}{col}" for row in range(5) for col in range(5)
                      if f"R{row}{col}" not in CORNER_RAFTS)
SENSORS = tuple(f"S{row}{col}" for row in range(3) for col in range(3))
ITL_RAFTS = frozenset({"R01", "R02", "R03", "R10", "R20", "R41", "R42", "R43"})
AMPLIFIERS_PER_DETECTOR = 16

_SECTION = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


@dataclass(frozen=True)
class ReadoutFormat:
    """How one vendor's amplifiers are read out (the same for all 16 amplifiers).

    Attributes
    ----------
    vendor : str
        ``ITL`` or ``E2V``, as the ``CCD_MANU`` keyword of LSSTCam raws spells it.
    prescan, data_cols, serial_overscan : int
        Columns of serial prescan, of image data and of serial overscan, in
        readout order.
    data_rows, parallel_overscan : int
        Rows of image data, then of parallel overscan.
    """

    vendor: str
    prescan: int
    data_cols: int
    serial_overscan: int
    data_rows: int
    parallel_overscan: int

    @property
    def raw_shape(self) -> tuple[int, int]:
        """(rows, cols) of one raw amplifier array."""
        return (self.data_rows + self.parallel_overscan,
                self.prescan + self.data_cols + self.serial_overscan)

    @property
    def data_shape(self) -> tuple[int, int]:
        """(rows, cols) of one amplifier's data section."""
        return (self.data_rows, self.data_cols)


ITL_READOUT = ReadoutFormat("ITL", prescan=3, data_cols=509, serial_overscan=64,
                            data_rows=2000, parallel_overscan=48)
E2V_READOUT = ReadoutFormat("E2V", prescan=10, data_cols=512, serial_overscan=54,
                            data_rows=2002, parallel_overscan=46)
READOUT_FORMATS = {fmt.vendor: fmt for fmt in (ITL_READOUT, E2V_READOUT)}


def format_section(x1: int, x2: int, y1: int, y2: int) -> str:
    """An IRAF section string ``[x1:x2,y1:y2]`` (1-based, inclusive, reversed = flipped)."""
    return f"[{x1}:{x2},{y1}:{y2}]"


def parse_section(text: str) -> tuple[int, int, int, int]:
    """The ``(x1, x2, y1, y2)`` of an IRAF section string such as ``[509:1,1:2000]``.

    Raises
    ------
    ValueError
        If ``text`` is not a two-dimensional section of positive integers.
    """
    match = _SECTION.match(text)
    if match is None or min(int(v) for v in match.groups()) < 1:
        raise ValueError(f"not an IRAF section: {text!r}")
    x1, x2, y1, y2 = (int(v) for v in match.groups())
    return x1, x2, y1, y2


@dataclass(frozen=True)
class AmplifierLayout:
    """Where one amplifier's pixels are, in its raw array and in the assembled detector.

    Attributes
    ----------
    name : str
        EXTNAME of the amplifier in raw files, ``SegmentXY`` (camera name ``CXY``).
    index : int
        0-based position among the detector's image extensions (HDU ``index + 1``).
    raw_shape, data_shape : tuple of int
        (rows, cols) of the raw array and of its data section.
    prescan, serial_overscan, parallel_overscan : int
        Columns of serial prescan and overscan, rows of parallel overscan.
    flip_x, flip_y : bool
        Whether the data section must be reversed along x (columns) or y (rows)
        to go from readout to assembled orientation.
    bbox : tuple of int
        ``(x_start, y_start, x_stop, y_stop)`` of the data in the assembled
        detector, 0-based, stop exclusive (numpy slice bounds).
    """

    name: str
    index: int
    raw_shape: tuple[int, int]
    data_shape: tuple[int, int]
    prescan: int
    serial_overscan: int
    parallel_overscan: int
    flip_x: bool
    flip_y: bool
    bbox: tuple[int, int, int, int]

    @property
    def data_slices(self) -> tuple[slice, slice]:
        """(rows, cols) slices of the data section in the raw array."""
        return slice(0, self.data_shape[0]), slice(self.prescan, self.prescan + self.data_shape[1])

    @property
    def serial_overscan_slices(self) -> tuple[slice, slice]:
        """Slices of the serial overscan next to the data rows in the raw array (BIASSEC)."""
        first = self.prescan + self.data_shape[1]
        return slice(0, self.data_shape[0]), slice(first, first + self.serial_overscan)

    @property
    def parallel_overscan_slices(self) -> tuple[slice, slice]:
        """Slices of the parallel overscan below the data columns in the raw array."""
        return (slice(self.data_shape[0], self.data_shape[0] + self.parallel_overscan),
                slice(self.prescan, self.prescan + self.data_shape[1]))

    @property
    def detector_slices(self) -> tuple[slice, slice]:
        """Slices of this amplifier's data in the assembled detector."""
        x0, y0, x1, y1 = self.bbox
        return slice(y0, y1), slice(x0, x1)

    @property
    def flip(self) -> tuple[slice, slice]:
        """Slices that turn a data section from readout to assembled orientation (and back)."""
        return slice(None, None, -1 if self.flip_y else 1), slice(None, None, -1 if self.flip_x else 1)

    @property
    def datasec(self) -> str:
        """DATASEC: the data section of the raw array, 1-based."""
        rows, cols = self.data_shape
        return format_section(self.prescan + 1, self.prescan + cols, 1, rows)

    @property
    def biassec(self) -> str:
        """BIASSEC: the serial overscan over the data rows, 1-based."""
        rows, cols = self.data_shape
        first = self.prescan + cols + 1
        return format_section(first, first + self.serial_overscan - 1, 1, rows)

    @property
    def detsec(self) -> str:
        """DETSEC: where DATASEC lands in the assembled detector; reversed ranges mean flips."""
        x0, y0, x1, y1 = self.bbox
        xs = (x1, x0 + 1) if self.flip_x else (x0 + 1, x1)
        ys = (y1, y0 + 1) if self.flip_y else (y0 + 1, y1)
        return format_section(*xs, *ys)


@cache
def amplifier_layouts(vendor: str) -> tuple[AmplifierLayout, ...]:
    """The 16 amplifiers of a detector of ``vendor`` (``ITL`` or ``E2V``) in raw-file order.

    The order is Segment10 … Segment17, then Segment07 … Segment00, as in LSSTCam raws.
    """
    fmt = READOUT_FORMATS[vendor]
    rows, cols = fmt.data_shape
    layouts = []
    names = [(1, k) for k in range(8)] + [(0, k) for k in range(7, -1, -1)]
    for index, (half, k) in enumerate(names):
        top = half == 1
        layouts.append(AmplifierLayout(
            name=f"Segment{half}{k}", index=index, raw_shape=fmt.raw_shape, data_shape=fmt.data_shape,
            prescan=fmt.prescan, serial_overscan=fmt.serial_overscan,
            parallel_overscan=fmt.parallel_overscan,
            flip_x=top or vendor == "ITL", flip_y=top,
            bbox=(k * cols, half * rows, (k + 1) * cols, (half + 1) * rows),
        ))
    return tuple(layouts)


@dataclass(frozen=True)
class DetectorGeometry:
    """One science detector of LSSTCam.

    Attributes
    ----------
    name : str
        Raft and sensor, e.g. ``R22_S11``.
    id : int
        Detector id in Rubin's obs_lsst numbering (0-188).
    vendor : str
        ``ITL`` or ``E2V``.
    center_mm : tuple of float
        Focal-plane position of the detector centre, mm.
    rotation_deg : float
        Rotation of the detector's pixel axes in the focal plane, deg (counter-clockwise).
    pixel_size_mm : float
        Pixel pitch, mm.
    pixel_scale_arcsec : float
        Pixel scale on the sky, arcsec per pixel.
    """

    name: str
    id: int
    vendor: str
    center_mm: tuple[float, float]
    rotation_deg: float = 0.0
    pixel_size_mm: float = PIXEL_SIZE_MM
    pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC

    @property
    def raft(self) -> str:
        return self.name[:3]

    @property
    def sensor(self) -> str:
        return self.name[4:]

    @property
    def readout(self) -> ReadoutFormat:
        return READOUT_FORMATS[self.vendor]

    @property
    def amplifiers(self) -> tuple[AmplifierLayout, ...]:
        return amplifier_layouts(self.vendor)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the assembled detector: 4000 x 4072 (ITL) or 4004 x 4096 (e2v)."""
        rows, cols = self.readout.data_shape
        return 2 * rows, 8 * cols

    @property
    def detsize(self) -> str:
        """DETSIZE, the assembled detector as a section string."""
        rows, cols = self.shape
        return format_section(1, cols, 1, rows)


@cache
def focal_plane() -> tuple[DetectorGeometry, ...]:
    """The 189 science detectors of LSSTCam, in detector-id order."""
    detectors = []
    for raft_index, raft in enumerate(SCIENCE_RAFTS):
        raft_x = (int(raft[2]) - 2) * RAFT_PITCH_MM
        raft_y = (int(raft[1]) - 2) * RAFT_PITCH_MM
        for sensor_index, sensor in enumerate(SENSORS):
            detectors.append(DetectorGeometry(
                name=f"{raft}_{sensor}", id=9 * raft_index + sensor_index,
                vendor="ITL" if raft in ITL_RAFTS else "E2V",
                center_mm=(raft_x + (int(sensor[2]) - 1) * SENSOR_PITCH_MM,
                           raft_y + (int(sensor[1]) - 1) * SENSOR_PITCH_MM),
            ))
    return tuple(detectors)


@cache
def _detectors_by_key() -> dict[int | str, DetectorGeometry]:
    return {key: det for det in focal_plane() for key in (det.id, det.name)}


def get_detector(key: int | str) -> DetectorGeometry:
    """The science detector with this id (0-188) or name (``R22_S11``).

    Raises
    ------
    KeyError
        If no science detector has that id or name.
    """
    try:
        return _detectors_by_key()[key]
    except KeyError:
        raise KeyError(f"no LSSTCam science detector {key!r}") from None


def _rotation(angle_deg: float) -> np.ndarray:
    angle = np.radians(angle_deg)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _reference_pixel(detector: DetectorGeometry) -> np.ndarray:
    """0-based (x, y) pixel coordinates of the detector centre."""
    rows, cols = detector.shape
    return np.array([(cols - 1) / 2.0, (rows - 1) / 2.0])


def pixel_to_focal_plane(detector: DetectorGeometry, x: np.ndarray | float, y: np.ndarray | float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane position (mm) of assembled-detector pixel coordinates.

    Parameters
    ----------
    detector : DetectorGeometry
    x, y : array_like
        0-based column and row of the assembled detector, pixels; broadcast together.

    Returns
    -------
    (x_mm, y_mm) : tuple of numpy.ndarray
        Focal-plane coordinates, mm, origin on the optical axis.
    """
    ref = _reference_pixel(detector)
    (a, b), (c, d) = _rotation(detector.rotation_deg) * detector.pixel_size_mm
    dx = np.asarray(x, dtype=float) - ref[0]
    dy = np.asarray(y, dtype=float) - ref[1]
    return detector.center_mm[0] + a * dx + b * dy, detector.center_mm[1] + c * dx + d * dy


def detector_wcs(detector: DetectorGeometry, ra_deg: float, dec_deg: float, rotation_deg: float) -> WCS:
    """Approximate TAN WCS of the assembled detector for a pointing.

    The focal plane is taken to be a perfect gnomonic projection about the
    boresight: no optical distortion (LSSTCam's is ~0.1″ at the edge of the
    field, obs_lsst ``cameraTransforms.yaml``), no refraction, no aberration.
    The tangent point is the boresight, so CRPIX is the pixel on the optical
    axis, usually far outside the detector.

    Parameters
    ----------
    detector : DetectorGeometry
    ra_deg, dec_deg : float
        Boresight, ICRS, deg.
    rotation_deg : float
        Sky position angle of the focal-plane +y axis, deg East of North (the
        ROTPA keyword).  At 0, +y points North and +x West, so the sky has its
        usual parity (East to the left when North is up).

    Returns
    -------
    astropy.wcs.WCS
        Pixel coordinates of the assembled detector (FITS convention, 1-based)
        to ICRS RA, Dec.
    """
    # Focal plane (mm) to intermediate world coordinates (deg, xi East, eta North).
    theta = np.radians(rotation_deg)
    sky = np.array([[-np.cos(theta), np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    deg_per_mm = detector.pixel_scale_arcsec / detector.pixel_size_mm / 3600.0
    pixel_to_mm = _rotation(detector.rotation_deg) * detector.pixel_size_mm
    axis_pixel = _reference_pixel(detector) - np.linalg.solve(pixel_to_mm, np.asarray(detector.center_mm))
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra_deg, dec_deg]
    wcs.wcs.crpix = axis_pixel + 1.0
    wcs.wcs.cd = deg_per_mm * sky @ pixel_to_mm
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.equinox = 2000.0
    return wcs


def _check_amps(raw_amps: Sequence[np.ndarray], detector: DetectorGeometry) -> None:
    if len(raw_amps) != AMPLIFIERS_PER_DETECTOR:
        raise ValueError(f"{detector.name}: {len(raw_amps)} amplifier arrays, expected 16")
    for amp, raw in zip(detector.amplifiers, raw_amps, strict=True):
        if raw.shape != amp.raw_shape:
            raise ValueError(f"{detector.name} {amp.name}: shape {raw.shape}, expected {amp.raw_shape}")


def assemble(raw_amps: Sequence[np.ndarray], detector: DetectorGeometry,
             dtype: DTypeLike | None = None) -> np.ndarray:
    """The assembled detector from its 16 raw amplifiers (data sections only, no bias subtraction).

    Parameters
    ----------
    raw_amps : sequence of numpy.ndarray
        The 16 raw amplifier arrays in raw-file order, readout orientation, ADU.
    detector : DetectorGeometry
    dtype : numpy dtype, optional
        Of the result; default that of the first amplifier.

    Returns
    -------
    numpy.ndarray
        ``detector.shape`` image in assembled orientation.
    """
    _check_amps(raw_amps, detector)
    image = np.empty(detector.shape, dtype=dtype or raw_amps[0].dtype)
    for amp, raw in zip(detector.amplifiers, raw_amps, strict=True):
        image[amp.detector_slices] = raw[amp.data_slices][amp.flip]
    return image


def disassemble(image: np.ndarray, detector: DetectorGeometry, fill: float = 0,
                dtype: DTypeLike | None = None) -> list[np.ndarray]:
    """Raw amplifier arrays whose data sections hold ``image`` (inverse of :func:`assemble`).

    Parameters
    ----------
    image : numpy.ndarray
        Assembled detector, ``detector.shape``.
    detector : DetectorGeometry
    fill : float
        Value of the prescan and overscan pixels.
    dtype : numpy dtype, optional
        Of the arrays; default that of ``image``.

    Returns
    -------
    list of numpy.ndarray
        16 arrays of ``amp.raw_shape`` in raw-file order and readout orientation.
    """
    if image.shape != detector.shape:
        raise ValueError(f"{detector.name}: image shape {image.shape}, expected {detector.shape}")
    amps = []
    for amp in detector.amplifiers:
        raw = np.full(amp.raw_shape, fill, dtype=dtype or image.dtype)
        raw[amp.data_slices] = image[amp.detector_slices][amp.flip]
        amps.append(raw)
    return amps
