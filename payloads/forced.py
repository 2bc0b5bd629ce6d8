"""Forced PSF photometry of known DiaObjects on a difference image and its science image.

Every DiaObject whose position falls on the detector gets a DiaForcedSource:
the flux of a point source at the object's fixed position (no centroiding),
measured with the local PSF of each image by a linear least-squares fit
weighted by the inverse pixel variances:

    flux = Σ w P d / Σ w P²,    error = (Σ w P²)^-½,

with P the PSF kernel at the object's pixel (from a grid of PSF evaluations,
:class:`~dmstream.payloads.diasource.PsfKernels`, normalised to the PSF's
total light) moved to the object's sub-pixel position by a Fourier
(band-limited) shift, d the image stamp and w = 1/variance, 0 on pixels that
carry no measurement (NO_DATA, SAT, BAD, unknown variance).  psfFlux is
measured on the difference image with its PSF, scienceFlux on the science
image with the science PSF; both in nJy through each image's zero point.

Objects off the image, or whose position falls on a NO_DATA pixel of the
difference, get no row: the APDB's DiaForcedSource has no flag columns to
mark them, so they are listed in the result instead.

diaForcedSourceId is a function of (diaObjectId, ccdVisitId) only (see
:func:`dia_forced_source_ids`), so a replay names every row as the first run did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import scipy.fft
from numpy.typing import ArrayLike, NDArray

from dmstream.payloads.diasource import UNFIT_PLANES, PsfKernels, njy_per_electron
from dmstream.payloads.ids import ccd_visit_id
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MaskPlane
from dmstream.payloads.psf import cutouts

#: Columns written, with the names, types and nullability of the APDB ``DiaForcedSource`` table.
#: ``timeProcessedMjdTai`` is the caller's (the APDB fills it when storing); ``timeWithdrawnMjdTai``
#: stays null for rows never withdrawn.
SCHEMA = pa.schema([
    pa.field("diaForcedSourceId", pa.int64(), nullable=False),
    pa.field("diaObjectId", pa.int64(), nullable=False),
    pa.field("ra", pa.float64(), nullable=False),
    pa.field("dec", pa.float64(), nullable=False),
    pa.field("visit", pa.int64(), nullable=False),
    pa.field("detector", pa.int16(), nullable=False),
    pa.field("psfFlux", pa.float32()),
    pa.field("psfFluxErr", pa.float32()),
    pa.field("midpointMjdTai", pa.float64(), nullable=False),
    pa.field("scienceFlux", pa.float32()),
    pa.field("scienceFluxErr", pa.float32()),
    pa.field("band", pa.string()),
])
#: Columns the DiaObject table handed to :func:`run` must have.
REQUIRED_OBJECT_COLUMNS = ("diaObjectId", "ra", "dec")
#: Pixels kept around the fitting stamp on the kernels that are shifted, so that the periodic wrap of the
#: Fourier shift stays off the pixels fitted: already with 2, a Kolmogorov PSF of 0.7-1.4" FWHM moved by up
#: to half a pixel matches the profile drawn at that offset to 10⁻⁷ in fitted flux.
_SHIFT_MARGIN = 3
#: Prime factors of the kernel sizes (odd, so that the shift of a real kernel stays real) that pocketfft
#: transforms fast; other primes take its much slower Bluestein path.
_FAST_FACTORS = (3, 5, 7, 11)

_MASK_63 = np.uint64((1 << 63) - 1)
#: Odd multipliers of the 63-bit mixer (those of SplitMix64's finaliser).
_MIX_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


class ForcedPhotometryError(ValueError):
    """Input forced photometry cannot measure: missing columns, duplicate objects, images without PSF,
    WCS or zero point, or images of different shapes."""


@dataclass(frozen=True)
class ForcedConfig:
    """How to measure.

    Attributes
    ----------
    stamp_fwhms : float
        Half-width of the fitting stamps, in FWHM of the wider of the two
        PSFs at the detector centre (at least 3 pixels).  1.5 FWHM hold
        99.98 % of a Kolmogorov PSF's information (Σ P²), so the flux errors
        are within 10⁻⁴ of a fit on all pixels.
    psf_grid : float
        Spacing of the nodes where the PSF models are evaluated, pixels;
        kernels in between are bilinear interpolations of the four nearest.
    """

    stamp_fwhms: float = 1.5
    psf_grid: float = 512.0


@dataclass
class ForcedResult:
    """DiaForcedSources of one detector-visit.

    Attributes
    ----------
    table : pyarrow.Table
        One row per measured DiaObject, in the order of the input, columns of ``SCHEMA``;
        fluxes in nJy, null where no pixel of the stamp could be fitted.
    off_image : numpy.ndarray
        diaObjectIds whose position falls off the detector (no row).
    no_data : numpy.ndarray
        diaObjectIds whose position falls on a NO_DATA pixel of the difference image (no row).
    """

    table: pa.Table
    off_image: NDArray[np.int64]
    no_data: NDArray[np.int64]


def _mix63(values: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """A bijection of [0, 2⁶³) that scatters neighbouring integers over the whole range.

    Each step is invertible on 63-bit integers (x ^ (x >> s) for s > 0, and
    multiplication by an odd number modulo 2⁶³), so the whole is.
    """
    v = values & _MASK_63
    v = ((v ^ (v >> np.uint64(30))) * _MIX_MULTIPLIERS[0]) & _MASK_63
    v = ((v ^ (v >> np.uint64(27))) * _MIX_MULTIPLIERS[1]) & _MASK_63
    return v ^ (v >> np.uint64(31))


def dia_forced_source_ids(dia_object_ids: ArrayLike, visit: int, detector: int) -> NDArray[np.int64]:
    """diaForcedSourceIds of DiaObjects measured on one detector-visit.

    The id is mix(mix(diaObjectId) + ccdVisitId mod 2⁶³), with mix a bijection
    of the 63-bit integers: non-negative, it fits a signed 64-bit integer and
    depends on nothing but the pair.  Both arguments enter through bijections,
    so two rows of one DiaObject (different ccdVisits) and two rows of one
    ccdVisit (different DiaObjects) can never share an id.  Rows that differ in
    both share one with probability 2⁻⁶³ per pair: about N²/2⁶⁴ coincidences
    among N rows, 5·10⁻⁴ for 10⁸ rows, ~5 for the 10¹⁰ of a year of Rubin.
    An exact packing cannot exist: a diaObjectId needs 63 bits and a
    ccdVisitId 49 (see :mod:`dmstream.payloads.ids`), and a per-detector-visit
    counter would depend on which other objects were measured.  The APDB's
    primary key is the pair itself (diaObjectId, visit, detector), so such a
    coincidence never merges rows.

    Parameters
    ----------
    dia_object_ids : array_like of int
        Non-negative diaObjectIds.
    visit, detector : int

    Returns
    -------
    numpy.ndarray of int64
    """
    ids = np.asarray(dia_object_ids, dtype=np.int64)
    if (ids < 0).any():
        raise ForcedPhotometryError("diaObjectIds must be non-negative")
    ccd_visit = np.uint64(ccd_visit_id(visit, detector))
    return _mix63(_mix63(ids.astype(np.uint64)) + ccd_visit).astype(np.int64)


def _fast_odd_size(minimum: int) -> int:
    """The smallest odd size ≥ ``minimum`` whose prime factors are all in ``_FAST_FACTORS``."""
    size = minimum | 1
    while True:
        rest = size
        for factor in _FAST_FACTORS:
            while rest % factor == 0:
                rest //= factor
        if rest == 1:
            return size
        size += 2


def _stamps(array: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: int, fill: float) -> np.ndarray:
    """:func:`~dmstream.payloads.psf.cutouts`, taking stamps that lie wholly on the image as windows of
    a strided view (whole rows copied, five times faster than indexing pixel by pixel)."""
    rows, cols = array.shape
    inside = (cx >= half) & (cx < cols - half) & (cy >= half) & (cy < rows - half)
    side = 2 * half + 1
    out = np.empty((cx.size, side, side), array.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(array, (side, side))
    out[inside] = windows[cy[inside] - half, cx[inside] - half]
    if not inside.all():
        out[~inside] = cutouts(array, cx[~inside], cy[~inside], half, fill=fill)[0]
    return out


def _psf_models(kernels: PsfKernels, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
    """(n, 2 half + 1, 2 half + 1) PSF models centred on (x, y), each on the stamp around its nearest pixel.

    The kernel at a pixel is the bilinear blend of the PSF at the four nodes
    of the ``kernels`` grid around it (with their normalisation), moved to the sub-pixel position by
    a phase ramp on its spectrum, which moves a band-limited profile exactly.
    Both steps are linear, so the blend is made of the nodes' spectra, one
    small matrix product per grid cell, and only the inverse transforms are
    per object.
    """
    size, spacing = kernels.size, kernels.spacing
    cx, cy = np.rint(x), np.rint(y)
    gx, gy = cx / spacing, cy / spacing
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix, gy - iy
    corner_weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    cells, cell_of = np.unique(np.stack([ix, iy], axis=1), axis=0, return_inverse=True)
    corners_x = (cells[:, 0, None] + np.array([0, 1, 0, 1])) * spacing
    corners_y = (cells[:, 1, None] + np.array([0, 0, 1, 1])) * spacing
    # At a node's own position the blend is that node's kernel alone.
    corner_spectra = scipy.fft.rfft2(kernels.at(corners_x.ravel(), corners_y.ravel(), size // 2), axes=(1, 2))
    corner_spectra = corner_spectra.reshape(len(cells), 4, -1)
    spectra = np.empty((x.size, corner_spectra.shape[-1]), np.complex64)
    order = np.argsort(cell_of.ravel(), kind="stable")
    starts = np.searchsorted(cell_of.ravel()[order], np.arange(len(cells)))
    for cell, members in enumerate(np.split(order, starts[1:])):
        spectra[members] = corner_weights[members].astype(np.complex64) @ corner_spectra[cell]
    spectra = spectra.reshape(x.size, size, size // 2 + 1)
    spectra *= np.exp(-2j * np.pi * scipy.fft.fftfreq(size)[None, :, None] * (y - cy)[:, None, None]
                      ).astype(np.complex64)
    spectra *= np.exp(-2j * np.pi * scipy.fft.rfftfreq(size)[None, None, :] * (x - cx)[:, None, None]
                      ).astype(np.complex64)
    moved = scipy.fft.irfft2(spectra, s=(size, size), axes=(1, 2))
    centre = size // 2
    return moved[:, centre - half:centre + half + 1, centre - half:centre + half + 1]


def psf_fluxes(image: CcdImage, kernels: PsfKernels, x: np.ndarray, y: np.ndarray, half: int
               ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Linear PSF fluxes at fixed positions, electrons, and their errors.

    Parameters
    ----------
    image : CcdImage
    kernels : PsfKernels
        Of ``image``'s PSF, at least ``2 (half + 3) + 1`` pixels wide (odd); an odd size with
        small prime factors only keeps the Fourier shift fast.
    x, y : numpy.ndarray
        Positions, pixels (0-based, x the column); their nearest pixel must lie on the image.
    half : int
        Half-width of the fitting stamps, pixels.

    Returns
    -------
    flux, flux_err : numpy.ndarray
        NaN where no pixel of the stamp can be fitted.
    """
    smallest = 2 * (half + _SHIFT_MARGIN) + 1
    if kernels.size < smallest or kernels.size % 2 == 0:
        raise ForcedPhotometryError(f"PSF kernels of {kernels.size} pixels cannot be shifted onto stamps "
                                    f"of ±{half}: need an odd size of at least {smallest}")
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    cx, cy = np.rint(x).astype(np.intp), np.rint(y).astype(np.intp)
    data = _stamps(image.image, cx, cy, half, 0.0)
    variance = _stamps(image.variance, cx, cy, half, np.nan)
    mask = _stamps(image.mask, cx, cy, half, int(MaskPlane.NO_DATA))
    usable = ((mask & UNFIT_PLANES) == 0) & np.isfinite(variance) & (variance > 0) & np.isfinite(data)
    weight = np.where(usable, 1.0 / np.where(usable, variance, 1.0), 0.0).astype(np.float32)
    data = np.where(usable, data, 0.0).astype(np.float32)
    model = _psf_models(kernels, x, y, half)
    weighted_model = weight * model
    information = np.einsum("npq,npq->n", weighted_model, model, dtype=np.float64)
    projection = np.einsum("npq,npq->n", weighted_model, data, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        measured = information > 0
        flux = np.where(measured, projection / np.where(measured, information, 1.0), np.nan)
        return flux, np.where(measured, 1.0 / np.sqrt(np.where(measured, information, 1.0)), np.nan)


def _check_inputs(difference: CcdImage, science: CcdImage, dia_objects: pa.Table) -> None:
    missing = [name for name in REQUIRED_OBJECT_COLUMNS if name not in dia_objects.column_names]
    if missing:
        raise ForcedPhotometryError(f"the DiaObject table lacks column {', '.join(missing)}")
    for name in REQUIRED_OBJECT_COLUMNS:
        if dia_objects.column(name).null_count:
            raise ForcedPhotometryError(f"the DiaObject table has nulls in {name}")
    if difference.shape != science.shape:
        raise ForcedPhotometryError(f"difference {difference.shape} and science {science.shape} differ in "
                                    "shape")
    if science.wcs is None:
        raise ForcedPhotometryError("the science image needs a WCS")
    for label, image in (("difference", difference), ("science", science)):
        if image.psf is None:
            raise ForcedPhotometryError(f"the {label} image needs a PSF")
        if image.zero_point is None:
            raise ForcedPhotometryError(f"the {label} image needs a zero point to give fluxes in nJy")


def run(difference: CcdImage, science: CcdImage, dia_objects: pa.Table, config: ForcedConfig | None = None,
        *, visit: int, detector: int, midpoint_mjd_tai: float) -> ForcedResult:
    """Forced PSF photometry of DiaObjects on a difference image and on its science image.

    Parameters
    ----------
    difference : CcdImage
        The difference image (``SubtractResult.difference``), with its PSF and
        zero point, on the science image's pixel grid.
    science : CcdImage
        The science image, with WCS (which places the objects on both), PSF and zero point.
    dia_objects : pyarrow.Table
        DiaObjects to measure: ``diaObjectId`` (unique, non-negative), ``ra``
        and ``dec`` (deg) at least; other columns are ignored.
    config : ForcedConfig, optional
    visit, detector : int
        Written to every row, and with the diaObjectId they make the diaForcedSourceId.
    midpoint_mjd_tai : float
        Mid-exposure time of the visit, MJD (TAI), written to every row.

    Returns
    -------
    ForcedResult

    Raises
    ------
    ForcedPhotometryError
        See :class:`ForcedPhotometryError`.
    """
    config = config or ForcedConfig()
    _check_inputs(difference, science, dia_objects)
    object_ids = dia_objects.column("diaObjectId").to_numpy().astype(np.int64)
    if np.unique(object_ids).size != object_ids.size:
        raise ForcedPhotometryError("the DiaObject table holds a diaObjectId more than once")
    ra = dia_objects.column("ra").to_numpy().astype(np.float64)
    dec = dia_objects.column("dec").to_numpy().astype(np.float64)
    ids = dia_forced_source_ids(object_ids, visit, detector)

    rows, cols = difference.shape
    x, y = (np.asarray(v, dtype=np.float64) for v in science.wcs.world_to_pixel_values(ra, dec))
    with np.errstate(invalid="ignore"):
        on_image = (np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < cols - 0.5) & (y > -0.5)
                    & (y < rows - 0.5))
    cx = np.where(on_image, np.rint(np.nan_to_num(x)), 0).astype(np.intp)
    cy = np.where(on_image, np.rint(np.nan_to_num(y)), 0).astype(np.intp)
    no_data = on_image & ((difference.mask[cy, cx] & MaskPlane.NO_DATA) != 0)
    keep = on_image & ~no_data
    x, y = x[keep], y[keep]

    centre = (cols - 1) / 2, (rows - 1) / 2
    fwhm = max(difference.psf.fwhm(*centre), science.psf.fwhm(*centre))
    half = max(int(np.ceil(config.stamp_fwhms * fwhm)), 3)
    kernel_size = _fast_odd_size(2 * (half + _SHIFT_MARGIN) + 1)
    fluxes = {}
    for label, image in (("psf", difference), ("science", science)):
        kernels = PsfKernels(image.psf, kernel_size, config.psf_grid, image.shape)
        flux, error = psf_fluxes(image, kernels, x, y, half)
        to_njy = njy_per_electron(image.zero_point)
        fluxes[label] = flux * to_njy, error * to_njy

    count = int(keep.sum())
    columns = {
        "diaForcedSourceId": ids[keep], "diaObjectId": object_ids[keep], "ra": ra[keep], "dec": dec[keep],
        "visit": np.full(count, visit), "detector": np.full(count, detector),
        "psfFlux": fluxes["psf"][0], "psfFluxErr": fluxes["psf"][1],
        "midpointMjdTai": np.full(count, midpoint_mjd_tai),
        "scienceFlux": fluxes["science"][0], "scienceFluxErr": fluxes["science"][1],
        "band": [science.band] * count,
    }
    # NaN fluxes (nothing fittable) become nulls, which both the APDB and the alert schema allow.
    arrays = [pa.array(columns[f.name], type=f.type, from_pandas=True) for f in SCHEMA]
    return ForcedResult(pa.Table.from_arrays(arrays, schema=SCHEMA), object_ids[~on_image],
                        object_ids[no_data])
