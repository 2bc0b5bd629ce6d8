"""Science, template and difference stamps around DiaSources as FITS bytes, for alerts.

Each cutout is one FITS file in the layout astropy's ``CCDData`` writes and
reads: a primary HDU with the image (nJy, ``BUNIT``) and the stamp's WCS, an
``UNCERT`` extension with the variance (``UTYPE = 'VarianceUncertainty'``)
and a ``MASK`` extension with the mask bits of
:class:`~dmstream.payloads.masks.MaskPlane` (int32).  The stamp side grows
with the PSF (``fwhm_multiple`` FWHM), clamped to the 30-102 pixels of the
alert contract.

Astropy's FITS writer costs about a millisecond per HDU; alerts need nine HDUs
per source and thousands of sources per visit, so headers are formatted here
from a per-image template (only NAXISn and CRPIXn change per stamp) and the
data written big-endian directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmstream.payloads.diasource import njy_per_electron
from dmstream.payloads.image import CcdImage
from dmstream.payloads.masks import MaskPlane

_BLOCK = 2880


@dataclass(frozen=True)
class CutoutConfig:
    """Stamp size.

    Attributes
    ----------
    fwhm_multiple : float
        Stamp side in PSF FWHM of the science image.
    min_size, max_size : int
        Clamp of the side, pixels (the alert contract: 30-102).
    """

    fwhm_multiple: float = 10.0
    min_size: int = 30
    max_size: int = 102


@dataclass
class Cutouts:
    """The three cutouts of one source, as the alert schema's bytes fields."""

    cutoutScience: bytes
    cutoutTemplate: bytes
    cutoutDifference: bytes


def stamp_size(fwhm: float, config: CutoutConfig | None = None) -> int:
    """Side of the cutouts for a PSF of ``fwhm`` pixels."""
    config = config or CutoutConfig()
    return int(np.clip(round(config.fwhm_multiple * fwhm), config.min_size, config.max_size))


def _card(key: str, value: object, comment: str = "") -> str:
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)):
        text = f"{int(value):>20d}"
    elif isinstance(value, (float, np.floating)):
        text = f"{float(value):>20.13G}"
    else:
        text = "'" + str(value).replace("'", "''").ljust(8) + "'"
    card = f"{key:<8}= {text}" + (f" / {comment}" if comment else "")
    return card[:80].ljust(80)


def _header_block(cards: list[str]) -> bytes:
    text = "".join(cards) + "END".ljust(80)
    return text.ljust(-(-len(text) // _BLOCK) * _BLOCK).encode("ascii")


def _data_block(array: np.ndarray) -> bytes:
    raw = array.astype(array.dtype.newbyteorder(">"), copy=False).tobytes()
    return raw + b"\0" * (-len(raw) % _BLOCK)


class _ImageWriter:
    """FITS bytes of stamps of one image: header cards computed once, per stamp only sizes and CRPIX."""

    def __init__(self, image: CcdImage, to_njy: float) -> None:
        if image.wcs is None:
            raise ValueError("cutouts need a WCS")
        self.image, self.to_njy = image, np.float32(to_njy)
        header = image.wcs.to_header(relax=True)
        self.crpix = (float(header.get("CRPIX1", 0.0)), float(header.get("CRPIX2", 0.0)))
        self.wcs_cards = [str(card).ljust(80) for card in header.cards
                          if card.keyword not in ("CRPIX1", "CRPIX2", "WCSAXES")]

    def _image_cards(self, bitpix: int, ny: int, nx: int, primary: bool) -> list[str]:
        first = _card("SIMPLE", True) if primary else _card("XTENSION", "IMAGE", "image extension")
        cards = [first, _card("BITPIX", bitpix), _card("NAXIS", 2), _card("NAXIS1", nx), _card("NAXIS2", ny)]
        return cards + ([_card("EXTEND", True)] if primary else [_card("PCOUNT", 0), _card("GCOUNT", 1)])

    def stamp(self, x0: int, y0: int, size: int) -> bytes:
        rows, cols = self.image.shape
        ys, xs = slice(max(y0, 0), min(y0 + size, rows)), slice(max(x0, 0), min(x0 + size, cols))
        ny, nx = size, size
        data = np.zeros((ny, nx), np.float32)
        var = np.full((ny, nx), np.nan, np.float32)
        mask = np.full((ny, nx), int(MaskPlane.NO_DATA), np.int32)
        inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        data[inner] = self.image.image[ys, xs] * self.to_njy
        var[inner] = self.image.variance[ys, xs] * self.to_njy**2
        mask[inner] = self.image.mask[ys, xs]
        wcs = ["WCSAXES =                    2".ljust(80), _card("CRPIX1", self.crpix[0] - x0),
               _card("CRPIX2", self.crpix[1] - y0), _card("LTV1", -x0, "stamp origin in the image"),
               _card("LTV2", -y0)]
        primary = [*self._image_cards(-32, ny, nx, True), *wcs, *self.wcs_cards, _card("BUNIT", "nJy")]
        uncert = [*self._image_cards(-32, ny, nx, False), _card("EXTNAME", "UNCERT"),
                  _card("UTYPE", "VarianceUncertainty"), _card("BUNIT", "nJy2"), *wcs, *self.wcs_cards]
        planes = [_card(f"MP_{plane.name}"[:8], int(plane).bit_length() - 1)
                  for plane in MaskPlane if plane.name]
        masks = [*self._image_cards(32, ny, nx, False), _card("EXTNAME", "MASK"), *wcs, *self.wcs_cards,
                 *planes]
        return b"".join((_header_block(primary), _data_block(data), _header_block(uncert), _data_block(var),
                         _header_block(masks), _data_block(mask)))


def make_cutouts(science: CcdImage, template: CcdImage, difference: CcdImage, x: np.ndarray, y: np.ndarray,
                 config: CutoutConfig | None = None) -> list[Cutouts]:
    """Cutouts of the three images around every (x, y).

    Parameters
    ----------
    science, template, difference : CcdImage
        On the same pixel grid (template PSF-matched or not, as the alert
        shows it), in electrons at the science zero point.
    x, y : numpy.ndarray
        Source centres, 0-based pixels.
    config : CutoutConfig, optional

    Returns
    -------
    list of Cutouts
        One per source; pixels off the image are NO_DATA, value 0, variance NaN.
    """
    config = config or CutoutConfig()
    if science.psf is None:
        raise ValueError("the science image needs a PSF to size the cutouts")
    to_njy = njy_per_electron(science.zero_point)
    to_njy = 1.0 if not np.isfinite(to_njy) else to_njy
    writers = [_ImageWriter(image, to_njy) for image in (science, template, difference)]
    out = []
    for sx, sy in zip(np.atleast_1d(x), np.atleast_1d(y), strict=True):
        size = stamp_size(science.psf.fwhm(float(sx), float(sy)), config)
        x0, y0 = round(float(sx)) - size // 2, round(float(sy)) - size // 2
        out.append(Cutouts(*(writer.stamp(x0, y0, size) for writer in writers)))
    return out
