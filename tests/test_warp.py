"""Resampling onto another grid at any relative rotation: fluxes and positions of point sources kept."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import empty_mask
from dmstream.payloads.warp import warp_image

SHAPE = (600, 600)
SIGMA = 2.0


def _wcs(angle: float) -> WCS:
    """0.2"/px TAN grid on (150, 2), turned by ``angle`` deg."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [SHAPE[1] / 2, SHAPE[0] / 2]
    turn = np.radians(angle)
    wcs.wcs.cd = np.array([[-np.cos(turn), np.sin(turn)], [np.sin(turn), np.cos(turn)]]) * 0.2 / 3600
    wcs.wcs.set()
    return wcs


@pytest.mark.parametrize("angle", [0.0, 30.0, 60.0, 85.0, 90.0, 93.0, 135.0, 180.0, 268.0, 315.0])
def test_point_sources_keep_flux_and_position_at_any_turn(angle: float) -> None:
    rng = np.random.default_rng(2)
    # Within 200 px of the centre, so that every source stays on the grid whatever the turn.
    radius, phase = 200 * np.sqrt(rng.uniform(0, 1, 30)), rng.uniform(0, 2 * np.pi, 30)
    x_true, y_true = 300 + radius * np.cos(phase), 300 + radius * np.sin(phase)
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    image = np.zeros(SHAPE, np.float32)
    for x, y in zip(x_true, y_true, strict=True):
        image += (100 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * SIGMA**2))).astype(np.float32)
    source = CcdImage(image, np.ones_like(image), empty_mask(SHAPE), _wcs(angle))
    target = _wcs(0.0)
    warped = warp_image(source, target, SHAPE).image.image
    x_new, y_new = target.world_to_pixel_values(*source.wcs.pixel_to_world_values(x_true, y_true))
    expected_flux = 100 * 2 * np.pi * SIGMA**2
    for x, y in zip(x_new, y_new, strict=True):
        aperture = (xx - x) ** 2 + (yy - y) ** 2 < 64
        flux = warped[aperture].sum()
        assert flux == pytest.approx(expected_flux, rel=0.005)
        centre = (warped * aperture * xx).sum() / flux, (warped * aperture * yy).sum() / flux
        assert np.hypot(centre[0] - x, centre[1] - y) < 0.05
