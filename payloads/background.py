"""Sky background of a CCD: a smooth model from a mesh of robust estimates, and its noise.

The model is SExtractor's, through ``sep``: the image is cut into meshes of
``mesh_size`` pixels, each gives a sigma-clipped mode of its pixels, the mesh
values are median-filtered over ``filter_size`` meshes (so that a bright star
or a galaxy that spoils one mesh does not dent the model) and interpolated
with a bicubic spline back to every pixel.  Masked pixels (defects, saturation,
cosmic rays, and optionally what detection already found) are left out of the
meshes.  The rms map is built the same way from the clipped scatter of each
mesh, in the image's units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from dmstream.payloads.masks import MaskPlane

#: Mask planes whose pixels never inform the background.
DEFAULT_BAD_PLANES = (MaskPlane.BAD | MaskPlane.SAT | MaskPlane.CR | MaskPlane.NO_DATA | MaskPlane.STREAK
                      | MaskPlane.DETECTED)


@dataclass(frozen=True)
class BackgroundConfig:
    """How the background is modelled.

    Attributes
    ----------
    mesh_size : int
        Side of a mesh, pixels; 128-256 follows sky gradients across a 4k CCD
        while staying much larger than any star's wings (a few arcsec).
    filter_size : int
        Side of the median filter over meshes, meshes (odd).
    bad_planes : int
        Mask bits whose pixels are left out of the meshes.
    """

    mesh_size: int = 128
    filter_size: int = 3
    bad_planes: int = int(DEFAULT_BAD_PLANES)

    def __post_init__(self) -> None:
        if self.mesh_size < 16 or self.filter_size < 1 or self.filter_size % 2 == 0:
            raise ValueError("mesh_size must be >= 16 and filter_size a positive odd number")


@dataclass(frozen=True)
class Background:
    """A background model and its noise.

    Attributes
    ----------
    model : numpy.ndarray
        float32, the sky at every pixel, image units (e⁻ per pixel).
    rms : numpy.ndarray
        float32, the sky noise at every pixel, image units.
    level : float
        Global sky level (sep's ``globalback``, over the mesh map), image units (e⁻ per pixel).
    noise : float
        Global sky rms (sep's ``globalrms``), image units.
    """

    model: np.ndarray
    rms: np.ndarray
    level: float
    noise: float


def estimate_background(image: np.ndarray, mask: np.ndarray | None = None,
                        config: BackgroundConfig | None = None) -> Background:
    """Model the sky of ``image``.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, e⁻ per pixel (any float dtype; float32 avoids a copy).
    mask : numpy.ndarray, optional
        uint32 :class:`~dmstream.payloads.masks.MaskPlane` bits; pixels with any
        of ``config.bad_planes`` set are ignored.
    config : BackgroundConfig, optional

    Returns
    -------
    Background
    """
    config = config or BackgroundConfig()
    data = np.ascontiguousarray(image, dtype=np.float32)
    ignore = None if mask is None else (mask & np.uint32(config.bad_planes)) != 0
    if ignore is not None and not ignore.any():
        ignore = None
    mesh = sep.Background(data, mask=ignore, bw=config.mesh_size, bh=config.mesh_size,
                          fw=config.filter_size, fh=config.filter_size)
    model = mesh.back(dtype=np.float32)
    rms = mesh.rms(dtype=np.float32)
    return Background(model=model, rms=rms, level=float(mesh.globalback), noise=float(mesh.globalrms))


def subtract_background(image: np.ndarray, mask: np.ndarray | None = None,
                        config: BackgroundConfig | None = None) -> tuple[np.ndarray, Background]:
    """The image minus its background model, and the model.

    Parameters
    ----------
    image, mask, config
        As for :func:`estimate_background`; ``image`` is not modified.

    Returns
    -------
    subtracted : numpy.ndarray
        float32, e⁻ per pixel above the sky.
    background : Background
    """
    background = estimate_background(image, mask, config)
    subtracted = np.subtract(image, background.model, dtype=np.float32)
    return subtracted, background
