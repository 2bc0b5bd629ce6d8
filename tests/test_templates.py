"""Templates built in batch from a simulated reference night, stored per sky tile, cut for a science CCD."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dmstream.backbone import Backbone
from dmstream.batch.templates import stored_tile, templates_for
from dmstream.payloads import forced
from dmstream.payloads.coadd import template_for
from dmstream.payloads.masks import MaskPlane
from dmstream.streams.rawfits import read_raw

pytestmark = pytest.mark.slow


def _science_raws(night) -> list:
    return [raw for raw in (read_raw(path) for path in sorted((night / "raw").rglob("*.fits")))
            if raw.primary_header["IMGTYPE"] == "OBJECT"]


def test_every_science_ccd_of_the_night_has_a_template(prepared_backbone: Backbone, small_nights) -> None:
    load = partial(stored_tile, prepared_backbone)
    for raw in _science_raws(small_nights.night):
        shape = raw.detector.shape
        result = template_for(templates_for(raw.wcs(), shape, "r", load), raw.wcs(), shape)
        assert result.coverage > 0.99
        assert result.template.psf is not None
        # Reference seeing is ~0.6" (0.8-0.85" with the optics and pixels), sharper than a typical visit.
        assert result.template.psf.fwhm(shape[1] / 2, shape[0] / 2) * 0.2 < 0.9


def test_reading_only_the_tile_sections_a_ccd_needs_changes_nothing(prepared_backbone: Backbone,
                                                                    small_nights) -> None:
    raw = _science_raws(small_nights.night)[0]
    wcs, shape = raw.wcs(), raw.detector.shape

    def whole(skytile: int, band: str, section: tuple[slice, slice]):
        return stored_tile(prepared_backbone, skytile, band)

    parts = templates_for(wcs, shape, "r", partial(stored_tile, prepared_backbone))
    assert sum(p.coadd.image.size for p in parts) < 0.5 * sum(p.coadd.image.size for p in
                                                               templates_for(wcs, shape, "r", whole))
    from_sections = template_for(parts, wcs, shape).template
    from_tiles = template_for(templates_for(wcs, shape, "r", whole), wcs, shape).template
    np.testing.assert_array_equal(from_sections.mask, from_tiles.mask)
    # The resampling's spline of the pixel mapping has its nodes on the part read, so values may
    # differ in the last digits, far below the noise.
    covered = np.isfinite(from_tiles.variance)
    difference = np.abs(from_sections.image - from_tiles.image)[covered]
    assert (difference <= 0.01 * np.sqrt(from_tiles.variance[covered])).all()


def test_template_stars_have_their_true_fluxes(prepared_backbone: Backbone, small_nights) -> None:
    truth = pq.read_table(small_nights.reference / "truth" / "sources.parquet")
    stars = truth.filter(pc.equal(truth["kind"], "star"))
    # Constant stars only: one flux in every exposure that saw them.
    grouped = stars.group_by("id").aggregate([("flux_njy", "min"), ("flux_njy", "max"), ("ra", "mean"),
                                              ("dec", "mean")])
    constant = grouped.filter(pc.less(pc.divide(grouped["flux_njy_max"], grouped["flux_njy_min"]), 1.0001))
    flux_all = constant["flux_njy_min"].to_numpy()
    star_ra, star_dec = constant["ra_mean"].to_numpy(), constant["dec_mean"].to_numpy()
    ratios, pulls = [], []
    for ref in prepared_backbone.query("template"):
        coadd = stored_tile(prepared_backbone, ref.data_id["skytile"], ref.data_id["band"]).coadd
        x, y = coadd.wcs.world_to_pixel_values(star_ra, star_dec)
        rows, cols = coadd.shape
        use = (x > 30) & (x < cols - 30) & (y > 30) & (y < rows - 30) & (flux_all > 1e3) & (flux_all < 2e6)
        use[use] &= (coadd.mask[np.round(y[use]).astype(int), np.round(x[use]).astype(int)]
                     & (MaskPlane.NO_DATA | MaskPlane.SAT)) == 0
        if not use.any():
            continue
        objects = pa.table({"diaObjectId": np.arange(use.sum(), dtype=np.int64), "ra": star_ra[use],
                            "dec": star_dec[use]})
        measured = forced.run(coadd, coadd, objects, visit=1, detector=0, midpoint_mjd_tai=61000.0).table
        truth_flux = flux_all[use][measured["diaObjectId"].to_numpy()]
        ratios.append(measured["psfFlux"].to_numpy() / truth_flux)
        pulls.append((measured["psfFlux"].to_numpy() - truth_flux) / measured["psfFluxErr"].to_numpy())
    ratio, pull = np.concatenate(ratios), np.concatenate(pulls)
    assert ratio.size >= 20, "too few unsaturated stars on the templates to test"
    # A PSF flux misses the light beyond the PSF model's stamp (~1.5 %, what calibrate's aperture
    # correction measures), and the coadd's zero point comes from each visit's calibration (~0.5 %).
    assert abs(np.median(ratio) - 1) < 0.03
    assert 1.4826 * np.median(np.abs(pull - np.median(pull))) < 1.5
