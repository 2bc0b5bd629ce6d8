"""Templates: tile coadds of earlier visits, built in batch and kept in the Data Backbone.

In Rubin, Prompt Processing subtracts templates made by an earlier data
release.  Here a batch job plays that part: it calibrates the science raws of
earlier nights that the backbone holds (their calexps are kept too), coadds
them per sky tile and band (:func:`dmstream.payloads.coadd.build_tile`) and
stores each tile's coadd as a ``template`` dataset (``skytile``, ``band``).
The coadd's PSF, a weighted sum of warped visit PSFs that lives only in
memory, is stored as a :class:`~dmstream.payloads.psf.PixelPsf` fitted to it.

Prompt Processing then cuts each science CCD's template from the tiles that
cover it (:func:`templates_for`, :func:`dmstream.payloads.coadd.template_for`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from astropy.wcs import WCS

from dmstream.backbone import Backbone, DatasetRef
from dmstream.batch import single_frame
from dmstream.logs import get_logger
from dmstream.payloads.coadd import CoaddResult, build_tile
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MaskPlane
from dmstream.payloads.psf import PixelPsf
from dmstream.payloads.tiles import DEFAULT_SKYMAP, SkyMap, Tile
from dmstream.payloads.warp import overlap_box
from dmstream.streams.rawfits import read_raw

log = get_logger(__name__)

TEMPLATE_TYPE = "template"
CALEXP_TYPE = "calexp"
#: Side of the stored template PSF stamps, pixels (±6 FWHM of a 1″ PSF).
PSF_STAMP = 61
#: Pixels read around the part of a tile a CCD covers.
SECTION_MARGIN = 48


class TemplateError(ValueError):
    """No template can be made or found for what was asked."""


@dataclass
class TemplateRun:
    """What :func:`build_templates` did."""

    calexps: list[DatasetRef] = field(default_factory=list)
    templates: list[DatasetRef] = field(default_factory=list)
    seconds: float = 0.0


def _science_raws(backbone: Backbone, day_obs: int, detectors: Sequence[int] | None) -> list[DatasetRef]:
    refs = [ref for ref in backbone.query("raw", day_obs=day_obs)
            if detectors is None or ref.data_id["detector"] in detectors]
    science = []
    for ref in refs:
        header = read_raw(backbone.datastore.absolute(ref.path)).primary_header
        if header["IMGTYPE"] == "OBJECT":
            science.append(ref)
    return science


def _calexp(backbone: Backbone, ref: DatasetRef) -> DatasetRef:
    """The calexp of a single-snap science raw, made unless the backbone has it."""
    data_id = ref.data_id
    calexp_id = {"instrument": data_id["instrument"], "day_obs": data_id["day_obs"],
                 "visit": data_id["exposure"], "detector": data_id["detector"]}
    if backbone.exists(CALEXP_TYPE, **calexp_id):
        return backbone.ref(CALEXP_TYPE, **calexp_id)
    image = single_frame.post_isr_image(backbone, data_id["instrument"], data_id["day_obs"],
                                        data_id["exposure"], data_id["detector"], data_id["band"])
    refcat = single_frame.reference_catalog(backbone, data_id["instrument"], data_id["day_obs"])
    calexp = single_frame.calibrate(image, refcat).image
    return backbone.put(calexp, CALEXP_TYPE, provenance="batch templates", **calexp_id)


def build_templates(backbone: Backbone, day_obs: Sequence[int], detectors: Sequence[int] | None = None,
                    skymap: SkyMap = DEFAULT_SKYMAP) -> TemplateRun:
    """Calibrate the science raws of the given nights and coadd them into tile templates.

    Parameters
    ----------
    backbone : Backbone
        Holding the raws, their calibrations and each night's reference catalog.
    day_obs : sequence of int
        The nights whose visits go into the templates.
    detectors : sequence of int, optional
        Detector ids to use (default: all).
    skymap : SkyMap

    Returns
    -------
    TemplateRun
    """
    started = time.monotonic()
    run = TemplateRun()
    raws = [ref for night in day_obs for ref in _science_raws(backbone, night, detectors)]
    if not raws:
        raise TemplateError(f"no science raws of day_obs {list(day_obs)} in the backbone")
    log.info("calibrating template visits", raws=len(raws))
    by_tile: dict[tuple[int, str], list[DatasetRef]] = defaultdict(list)
    for number, raw in enumerate(raws, start=1):
        calexp_ref = _calexp(backbone, raw)
        run.calexps.append(calexp_ref)
        calexp: CcdImage = backbone.get(CALEXP_TYPE, **calexp_ref.data_id)
        for tile in skymap.tiles_overlapping(calexp.wcs, calexp.shape):
            by_tile[(tile.id, calexp.band)].append(calexp_ref)
        log.info("template visit calibrated", done=number, total=len(raws), visit=raw.data_id["exposure"],
                 detector=raw.data_id["detector"])
    for number, ((tile_id, band), refs) in enumerate(sorted(by_tile.items()), start=1):
        tile = skymap.tile(tile_id)
        visits = [backbone.get(CALEXP_TYPE, **ref.data_id) for ref in refs]
        coadd = build_tile(visits, tile).coadd
        stored = replace(coadd, psf=PixelPsf.approximating(coadd.psf, coadd.shape, PSF_STAMP))
        run.templates.append(backbone.put(stored, TEMPLATE_TYPE, provenance=f"coadd of {len(visits)} calexps",
                                          skytile=tile_id, band=band))
        log.info("template tile built", done=number, total=len(by_tile), tile=tile.name, band=band,
                 visits=len(visits))
    run.seconds = time.monotonic() - started
    return run


def stored_tile(backbone: Backbone, skytile: int, band: str, section: tuple[slice, slice] | None = None,
                skymap: SkyMap = DEFAULT_SKYMAP) -> CoaddResult | None:
    """The stored template of a sky tile in a band (or only a section of it), or None if there is none.

    A section's pixels keep their WCS, so :func:`~dmstream.payloads.coadd.template_for`
    resamples them as it would the whole tile, without the rest ever being read.
    """
    if not backbone.exists(TEMPLATE_TYPE, skytile=skytile, band=band):
        return None
    coadd: CcdImage = backbone.get(TEMPLATE_TYPE, section=section, skytile=skytile, band=band)
    covered = ((coadd.mask & MaskPlane.NO_DATA) == 0).astype(np.int16)
    # Pixels, variance, mask, PSF and zero point are stored; the visit weights and depth are not.
    return CoaddResult(coadd, np.empty(0), covered, skymap.tile(skytile))


def templates_for(wcs: WCS, shape: tuple[int, int], band: str,
                  load: Callable[[int, str, tuple[slice, slice]], CoaddResult | None],
                  skymap: SkyMap = DEFAULT_SKYMAP) -> list[CoaddResult]:
    """The parts of the tile templates a CCD needs, for :func:`dmstream.payloads.coadd.template_for`.

    Parameters
    ----------
    load : callable
        ``load(skytile, band, section)``: that section of a tile's template, or
        None (:func:`stored_tile` with a backbone).

    Raises
    ------
    TemplateError
        If none of the tiles the CCD overlaps has a template in ``band``.
    """
    tiles: list[Tile] = skymap.tiles_overlapping(wcs, shape)
    found = []
    for tile in tiles:
        box = overlap_box(wcs, shape, tile.wcs, tile.shape)
        if box is None:
            continue
        # Room for the resampling's taps and the block-wise ownership of template pixels.
        rows, cols = tile.shape
        section = (slice(max(box[0].start - SECTION_MARGIN, 0), min(box[0].stop + SECTION_MARGIN, rows)),
                   slice(max(box[1].start - SECTION_MARGIN, 0), min(box[1].stop + SECTION_MARGIN, cols)))
        coadd = load(tile.id, band, section)
        if coadd is not None:
            found.append(coadd)
    if not found:
        raise TemplateError(f"no {band}-band template for tiles {', '.join(t.name for t in tiles)}")
    return found
