"""Sky pixels that key the association state: HEALPix cells in nested order (``hpgeom``).

DiaObjects are stored by the pixel of their position, so that a stream keyed
by pixel finds every object a DiaSource can match in a few table values.  A
DiaSource is matched against the objects of every pixel its match circle
overlaps (:func:`pixels_touching`), not only of the pixel it falls in: an
object across a pixel boundary, less than the match radius away, is stored
under the neighbouring key.  Before a visit's pixels arrive, the objects of
every pixel a detector's footprint overlaps, grown by the match radius, are
loaded (:func:`pixels_of_footprint`).

All angles are in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import hpgeom
import numpy as np
from numpy.typing import ArrayLike, NDArray

from dmstream.payloads.astrometry import gnomonic, inverse_gnomonic


class SkyPixelError(ValueError):
    """A position, radius or footprint that sky pixels cannot be found for."""


@dataclass(frozen=True)
class SkyPixelConfig:
    """The HEALPix grid of the association state.

    Attributes
    ----------
    order : int
        Nested HEALPix order (nside = 2**order).  The default, 10, makes
        pixels of 0.0033 deg², 3.4 arcmin across:

        - 200 times the 1″ match radius, so that few DiaSources need a
          second pixel's objects: those within 1″ of an edge, 2 % of them,
          and 4 % by HEALPix's inclusive query, which also names pixels a
          circle nearly touches (measured by ``dmstream.benchmarks.association``);
        - a quarter of an LSSTCam CCD's side (13.6 arcmin): one CCD's
          footprint touches ~30 keys, so its DiaSources spread over the
          partitions and workers of the stream instead of loading one;
        - small enough that one table value stays far below Kafka's 1 MiB
          message: at 5·10⁴ DiaObjects per deg², a density reached after
          years of a survey, a pixel holds ~160 objects, 0.15 MiB of state
          (944 bytes per object in Arrow IPC, measured by the same benchmark).

        Order 9 (6.9 arcmin) would put 4 times as many objects in a value
        and a CCD on ~9 keys; order 11 (1.7 arcmin) doubles the share of
        sources at an edge and the messages per CCD.
    """

    order: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.order <= 29:
            raise SkyPixelError(f"HEALPix order {self.order} is outside [0, 29]")

    @property
    def nside(self) -> int:
        return 1 << self.order

    @property
    def pixel_area(self) -> float:
        """Area of one pixel, deg²."""
        return float(hpgeom.nside_to_pixel_area(self.nside, degrees=True))


DEFAULT_SKYPIXELS = SkyPixelConfig()


def _positions(ra: ArrayLike, dec: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    ra_array = np.atleast_1d(np.asarray(ra, dtype=float))
    dec_array = np.atleast_1d(np.asarray(dec, dtype=float))
    if ra_array.shape != dec_array.shape:
        raise SkyPixelError(f"ra has shape {ra_array.shape} but dec has {dec_array.shape}")
    if not (np.all(np.isfinite(ra_array)) and np.all(np.isfinite(dec_array))):
        raise SkyPixelError("positions must be finite")
    if np.any(np.abs(dec_array) > 90.0):
        raise SkyPixelError("declinations must be within [-90, 90] deg")
    return ra_array % 360.0, dec_array


def unit_vectors(ra: ArrayLike, dec: ArrayLike) -> NDArray[np.float64]:
    """Cartesian unit vectors (..., 3) of positions."""
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)], axis=-1)


def pixel_of(ra: ArrayLike, dec: ArrayLike, config: SkyPixelConfig = DEFAULT_SKYPIXELS) -> NDArray[np.int64]:
    """The pixel each position falls in: the key its DiaObject is stored under.

    Parameters
    ----------
    ra, dec : array_like
        Positions, deg.
    config : SkyPixelConfig, optional

    Returns
    -------
    numpy.ndarray
        Nested pixel numbers, int64, one per position.

    Raises
    ------
    SkyPixelError
        If the arrays differ in shape or hold a non-finite or impossible position.
    """
    ra_array, dec_array = _positions(ra, dec)
    return hpgeom.angle_to_pixel(config.nside, ra_array, dec_array, nest=True).astype(np.int64)


def pixels_touching(ra: ArrayLike, dec: ArrayLike, radius: float,
                    config: SkyPixelConfig = DEFAULT_SKYPIXELS) -> NDArray[np.int64]:
    """Every pixel that a circle of ``radius`` about any of the positions overlaps.

    The keys whose objects a batch of DiaSources must be matched against.
    HEALPix's inclusive circle query may name a pixel that the circle only
    nearly touches; never does it miss one.

    Parameters
    ----------
    ra, dec : array_like
        Centres, deg.
    radius : float
        Radius of the circles (the match radius), deg.
    config : SkyPixelConfig, optional

    Returns
    -------
    numpy.ndarray
        Sorted, distinct nested pixel numbers, int64.

    Raises
    ------
    SkyPixelError
        If a position is invalid or the radius is not positive and finite.
    """
    ra_array, dec_array = _positions(ra, dec)
    if not (np.isfinite(radius) and radius > 0.0):
        raise SkyPixelError(f"radius must be positive and finite, got {radius}")
    own = pixel_of(ra_array, dec_array, config)
    # Most circles lie inside their own pixel; only those reaching a neighbour need HEALPix's query.
    near_edge = _may_leave_pixel(ra_array, dec_array, radius, own, config)
    pixels = [own]
    for centre_ra, centre_dec in zip(ra_array[near_edge], dec_array[near_edge], strict=True):
        pixels.append(hpgeom.query_circle(config.nside, centre_ra, centre_dec, radius, inclusive=True,
                                          nest=True))
    return np.unique(np.concatenate(pixels)).astype(np.int64)


def _may_leave_pixel(ra: NDArray[np.float64], dec: NDArray[np.float64], radius: float, own: NDArray[np.int64],
                     config: SkyPixelConfig) -> NDArray[np.bool_]:
    """Whether the circle about each position may reach beyond its own pixel (never False where it does).

    Probe points on a circle of twice the radius, which is small beside a
    pixel (the test gives up and says True otherwise).  On that scale a
    pixel's edges are straight, so an edge crossing the match circle leaves
    outside the pixel an arc of more than 120° of the probe circle; and
    HEALPix pixels' corners have interior angles between 52° and 147°, so
    near a corner the outside is a wedge of more than 210°.  Sixteen probes,
    22.5° apart, cannot all miss either.
    """
    probes = 16
    if radius * 8 > hpgeom.max_pixel_radius(config.nside, degrees=True):
        return np.ones(ra.size, bool)
    angles = np.linspace(0.0, 360.0, probes, endpoint=False)
    xi = 2 * radius * np.sin(np.radians(angles))
    eta = 2 * radius * np.cos(np.radians(angles))
    probe_ra, probe_dec = inverse_gnomonic(xi[None, :], eta[None, :], ra[:, None], dec[:, None])
    probe_pixels = hpgeom.angle_to_pixel(config.nside, probe_ra.ravel(), probe_dec.ravel(), nest=True)
    return np.any(probe_pixels.reshape(ra.size, probes) != own[:, None], axis=1)


def pixels_of_footprint(ra: ArrayLike, dec: ArrayLike, margin: float = 0.0,
                        config: SkyPixelConfig = DEFAULT_SKYPIXELS) -> NDArray[np.int64]:
    """Every pixel that a convex footprint, grown by ``margin``, overlaps.

    The keys whose DiaObjects a detector needs, preloaded when its visit is
    announced: pass the detector's corners and the match radius as margin,
    so that objects just off the detector that a source at its edge can
    match are loaded too.  For an astropy WCS of an image of ``shape``,
    the corners are ``wcs.calc_footprint(axes=shape[::-1], center=False)``.

    Parameters
    ----------
    ra, dec : array_like
        Vertices of a convex polygon, deg, in order around it (either way).
    margin : float, optional
        Distance by which every edge is pushed outwards, deg.
    config : SkyPixelConfig, optional

    Returns
    -------
    numpy.ndarray
        Sorted, distinct nested pixel numbers, int64.

    Raises
    ------
    SkyPixelError
        If there are fewer than 3 vertices, the polygon is not convex (or
        has repeated vertices), spans more than a hemisphere, or the margin
        is negative.
    """
    ra_array, dec_array = _positions(ra, dec)
    if ra_array.size < 3:
        raise SkyPixelError(f"a footprint needs at least 3 vertices, got {ra_array.size}")
    if not (np.isfinite(margin) and margin >= 0.0):
        raise SkyPixelError(f"margin must be non-negative and finite, got {margin}")
    centre = unit_vectors(ra_array, dec_array).mean(axis=0)
    centre_ra = float(np.degrees(np.arctan2(centre[1], centre[0])) % 360.0)
    centre_dec = float(np.degrees(np.arctan2(centre[2], np.hypot(centre[0], centre[1]))))
    cos_from_centre = unit_vectors(ra_array, dec_array) @ (centre / np.linalg.norm(centre))
    if np.any(cos_from_centre <= 0.1):
        raise SkyPixelError("the footprint spans more than a hemisphere")
    xi, eta = gnomonic(ra_array, dec_array, centre_ra, centre_dec)
    vertices = np.column_stack([xi, eta])
    edges = np.roll(vertices, -1, axis=0) - vertices
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if not (np.all(turns > 0) or np.all(turns < 0)):
        raise SkyPixelError("the footprint is not a convex polygon with distinct vertices")
    if turns[0] < 0:
        vertices = vertices[::-1]
        edges = np.roll(vertices, -1, axis=0) - vertices
    if margin > 0.0:
        # The tangent plane stretches distances by up to sec² of the angle from its centre: grow by that much.
        stretch = 1.0 / np.min(cos_from_centre) ** 2
        vertices = _grown(vertices, edges, margin * stretch)
        ra_array, dec_array = inverse_gnomonic(vertices[:, 0], vertices[:, 1], centre_ra, centre_dec)
    return hpgeom.query_polygon(config.nside, ra_array, dec_array, inclusive=True, nest=True).astype(np.int64)


def _grown(vertices: NDArray[np.float64], edges: NDArray[np.float64], margin: float) -> NDArray[np.float64]:
    """Vertices of a counter-clockwise convex polygon whose edges are moved ``margin`` outwards."""
    unit = edges / np.linalg.norm(edges, axis=1)[:, None]
    outward = np.column_stack([unit[:, 1], -unit[:, 0]])
    # Vertex k joins edge k-1 (entering) and edge k (leaving); it moves to where the moved edges meet.
    entering, leaving = np.roll(outward, 1, axis=0), outward
    bisector = entering + leaving
    return vertices + margin * bisector / (1.0 + np.sum(entering * leaving, axis=1))[:, None]
