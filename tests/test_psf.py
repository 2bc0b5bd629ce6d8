"""PSF models: approximating a model that only exists in memory by a stored PixelPsf."""

from __future__ import annotations

import numpy as np

from dmstream.payloads.psf import PixelPsf


class WideningGaussian:
    """A round Gaussian whose width grows linearly across the detector (sigma 2.0 to 2.4 px)."""

    def sigma(self, x: float, y: float) -> float:
        return 2.0 + 0.3 * x / 1000 + 0.1 * y / 1000

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        half = size // 2
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        stamp = np.exp(-(xx**2 + yy**2) / (2 * self.sigma(x, y) ** 2))
        return stamp / stamp.sum()

    def fwhm(self, x: float, y: float) -> float:
        return 2.3548 * self.sigma(x, y)


def test_a_pixel_psf_follows_the_model_it_approximates() -> None:
    model = WideningGaussian()
    approximation = PixelPsf.approximating(model, (1000, 1000), 25)
    for x, y in [(0, 0), (500, 500), (999, 999), (250, 800), (990, 10)]:
        wanted = model.kernel(x, y, 25)
        assert np.abs(approximation.kernel(x, y, 25) - wanted).max() < 3e-3 * wanted.max()
        assert abs(approximation.fwhm(x, y) / model.fwhm(x, y) - 1) < 0.03
