"""Camera readout on Kafka: one message per amplifier, keyed by detector.

A raw e2v CCD is ~75 MB as int32, so pixels travel compressed: the int32
bytes are split into four byte planes (high bytes of neighbouring pixels are
nearly equal, which compressors love) and compressed with Zstandard at level 1.
Measured on a simulated amplifier: ratio ~4.9 at ~2 GB/s, against 3.2 at
0.3 GB/s without the shuffle.  A detector's 16 messages carry the FITS headers
too, so the raw file is rebuilt exactly on the other side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cramjam
import numpy as np
from astropy.io import fits

PIXEL_DTYPE = np.dtype("<i4")
ZSTD_LEVEL = 1


class ReadoutError(ValueError):
    """Readout messages that cannot be decoded or do not make up a detector."""


def compress_pixels(pixels: np.ndarray) -> bytes:
    """Byte-shuffle and Zstandard-compress an int32 amplifier image."""
    planes = np.ascontiguousarray(pixels.astype(PIXEL_DTYPE, copy=False)).view(np.uint8)
    shuffled = np.ascontiguousarray(planes.reshape(-1, PIXEL_DTYPE.itemsize).T)
    return bytes(cramjam.zstd.compress(shuffled.tobytes(), level=ZSTD_LEVEL))


def decompress_pixels(payload: bytes, rows: int, cols: int, compression: str = "zstd-shuffle4"
                      ) -> np.ndarray:
    """Inverse of :func:`compress_pixels`; returns an int32 array of shape (rows, cols)."""
    size = rows * cols * PIXEL_DTYPE.itemsize
    try:
        if compression == "none":
            raw = np.frombuffer(payload, dtype=np.uint8)
        elif compression == "zstd-shuffle4":
            planes = np.frombuffer(bytes(cramjam.zstd.decompress(payload)), dtype=np.uint8)
            raw = np.ascontiguousarray(planes.reshape(PIXEL_DTYPE.itemsize, -1).T).reshape(-1)
        else:
            raise ReadoutError(f"unknown pixel compression {compression!r}")
    except cramjam.DecompressionError as exc:
        raise ReadoutError(f"pixels do not decompress: {exc}") from exc
    if raw.size != size:
        raise ReadoutError(f"pixels hold {raw.size} bytes, expected {size} for {rows}x{cols} int32")
    return raw.view(PIXEL_DTYPE).reshape(rows, cols)


def _header_value(header: fits.Header, key: str, default: Any) -> Any:
    value = header.get(key, default)
    return default if value is None else value


def amplifier_messages(primary: fits.Header, amps: Iterable[tuple[fits.Header, np.ndarray]],
                       sent_tai: float) -> list[dict[str, Any]]:
    """The readout messages of one detector from its raw FITS headers and amplifier arrays.

    Parameters
    ----------
    primary : astropy.io.fits.Header
        Primary header of the raw file (OBSID, DAYOBS, SEQNUM, DETECTOR, ...).
    amps : iterable of (Header, ndarray)
        Each amplifier's extension header and raw int32 pixels, in file order.
    sent_tai : float
        When the camera sends them, TAI unix seconds.
    """
    amps = list(amps)
    day_obs = int(_header_value(primary, "DAYOBS", 0))
    seq_num = int(_header_value(primary, "SEQNUM", 0))
    common = {
        "instrument": str(_header_value(primary, "INSTRUME", "LSSTCam")),
        "obsId": str(_header_value(primary, "OBSID", "")),
        "exposureId": day_obs * 100000 + seq_num,
        "dayObs": day_obs,
        "seqNum": seq_num,
        "groupId": str(_header_value(primary, "GROUPID", "")),
        "imgType": str(_header_value(primary, "IMGTYPE", "")),
        "detector": int(_header_value(primary, "DETECTOR", -1)),
        "detectorName": str(_header_value(primary, "DETNAME", "")),
        "ampCount": len(amps),
        "primaryHeader": primary.tostring(),
        "private_sndStamp": sent_tai,
    }
    messages = []
    for index, (header, pixels) in enumerate(amps):
        messages.append({
            **common,
            "ampIndex": index,
            "ampName": str(header.get("EXTNAME", f"Segment{index:02d}")),
            "rows": int(pixels.shape[0]),
            "cols": int(pixels.shape[1]),
            "dtype": PIXEL_DTYPE.str,
            "compression": "zstd-shuffle4",
            "pixels": compress_pixels(pixels),
            "ampHeader": header.tostring(),
        })
    return messages


@dataclass
class DetectorReadout:
    """The amplifiers of one detector of one exposure gathered from their messages."""

    obs_id: str
    detector_name: str
    amp_count: int
    primary: fits.Header
    amps: dict[int, tuple[fits.Header, np.ndarray]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.amps) == self.amp_count

    def hdu_list(self) -> fits.HDUList:
        """The raw file as astropy HDUs (primary, then the amplifiers in file order)."""
        if not self.complete:
            raise ReadoutError(f"{self.obs_id} {self.detector_name}: only {len(self.amps)} of "
                               f"{self.amp_count} amplifiers arrived")
        hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU] = [fits.PrimaryHDU(header=self.primary)]
        for index in sorted(self.amps):
            header, pixels = self.amps[index]
            hdus.append(fits.ImageHDU(data=pixels, header=header))
        return fits.HDUList(hdus)


class ReadoutCollector:
    """Gather amplifier messages until each detector of each exposure is complete.

    Messages of one detector arrive in order on one partition, but several
    detectors and exposures interleave; a detector is handed back the moment
    its last amplifier arrives.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], DetectorReadout] = {}

    def add(self, message: dict[str, Any]) -> DetectorReadout | None:
        key = (message["obsId"], message["detectorName"])
        readout = self._pending.get(key)
        if readout is None:
            readout = DetectorReadout(
                obs_id=message["obsId"], detector_name=message["detectorName"],
                amp_count=int(message["ampCount"]),
                primary=fits.Header.fromstring(message["primaryHeader"]),
            )
            self._pending[key] = readout
        pixels = decompress_pixels(message["pixels"], message["rows"], message["cols"],
                                   message["compression"])
        readout.amps[int(message["ampIndex"])] = (fits.Header.fromstring(message["ampHeader"]), pixels)
        if readout.complete:
            del self._pending[key]
            return readout
        return None

    def discard(self, obs_id: str, detector_name: str) -> None:
        """Forget a detector's amplifiers gathered so far (its readout cannot be completed)."""
        self._pending.pop((obs_id, detector_name), None)

    @property
    def incomplete(self) -> list[DetectorReadout]:
        return list(self._pending.values())
