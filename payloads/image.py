"""The image of one CCD that the science steps hand to each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from astropy.wcs import WCS

from dmstream.payloads.masks import MASK_DTYPE


class PsfModel(Protocol):
    """What every step needs of a point-spread function, wherever it came from.

    Positions are 0-based pixels of the assembled detector (x = column).
    """

    def kernel(self, x: float, y: float, size: int) -> np.ndarray:
        """The PSF centred on the middle pixel of a ``size`` x ``size`` (odd) stamp, summing to 1."""
        ...

    def fwhm(self, x: float, y: float) -> float:
        """Full width at half maximum at (x, y), pixels."""
        ...


@dataclass
class CcdImage:
    """An assembled CCD: pixels, their variance and mask, and what is known about them.

    Attributes
    ----------
    image : numpy.ndarray
        float32, electrons (after ISR), background-subtracted once calibrated.
    variance : numpy.ndarray
        float32, electrons², per pixel.
    mask : numpy.ndarray
        uint32 bit flags of :class:`~dmstream.payloads.masks.MaskPlane`.
    wcs : astropy.wcs.WCS or None
        Pixel → sky (0-based pixels as astropy uses them).
    psf : PsfModel or None
    zero_point : float or None
        AB magnitude of a source giving 1 electron in the whole exposure.
    band : str
    exptime : float
        Seconds.
    metadata : dict
        Header-like facts (OBSID, DETECTOR, MJD-OBS, ...).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS | None = None
    psf: PsfModel | None = None
    zero_point: float | None = None
    band: str = ""
    exptime: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.shape != self.variance.shape or self.image.shape != self.mask.shape:
            raise ValueError(f"image {self.image.shape}, variance {self.variance.shape} and mask "
                             f"{self.mask.shape} differ in shape")
        if self.mask.dtype != MASK_DTYPE:
            raise ValueError(f"mask must be {MASK_DTYPE}, got {self.mask.dtype}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape  # type: ignore[return-value]
