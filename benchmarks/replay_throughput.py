"""Replay throughput into Kafka: full-size raw CCDs from a night directory onto the broker.

Run against a running stack (``dmstream stack up``)::

    python -m dmstream.benchmarks.replay_throughput --ccds 12

It writes a night of ``--ccds`` full-size e2v flat-field raw files (the
pixels are realistic enough for compression: photon noise on ~30 000 e⁻),
replays it as fast as Kafka takes it, and prints the throughput both in bytes
on the wire (compressed) and in raw int32 pixel bytes, beside the reference
unit of this machine (one 4096x4096 ``scipy.fft.rfft2``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from dmstream import settings
from dmstream.benchmarks.timing import rfft2_unit
from dmstream.payloads.camera import get_detector
from dmstream.streams.camera import DetectorElectronics, simulate_raw
from dmstream.streams.night import EventLogWriter, Manifest, raw_path
from dmstream.streams.rawfits import read_raw, write_raw
from dmstream.streams.readout import amplifier_messages
from dmstream.streams.replay import ReplayConfig, replay

DAY_OBS = 20261209



def write_night(root: Path, ccds: int, compress: bool) -> int:
    """A night of ``ccds`` flat-field exposures of R22_S11; returns raw pixel bytes."""
    detector = get_detector("R22_S11")
    electronics = DetectorElectronics.draw(detector, seed=1)
    signal = np.full(detector.shape, 30000.0, dtype=np.float32)
    pixel_bytes = 0
    with EventLogWriter(root) as events:
        for seq in range(1, ccds + 1):
            amps = simulate_raw(signal, 10.0, 10.0, electronics, np.random.default_rng(seq))
            pixel_bytes += sum(a.nbytes for a in amps)
            obs_id = f"MC_O_{DAY_OBS}_{seq:06d}"
            path = raw_path(root, DAY_OBS, seq, obs_id, detector.name)
            header = {"OBSID": obs_id, "DAYOBS": DAY_OBS, "SEQNUM": seq, "GROUPID": obs_id,
                      "IMGTYPE": "FLAT", "EXPTIME": 10.0, "DARKTIME": 10.0, "MJD-OBS": 61018.0 + seq / 1e4,
                      "FILTBAND": "r", "RA": 0.0, "DEC": -30.0, "ROTPA": 0.0}
            write_raw(path, header, amps, detector, compress=compress)
            events.readout(1.8e9 + 40 * seq, path, detector.name)
    Manifest(instrument="LSSTCam", day_obs=DAY_OBS, detectors=[detector.name]).write(root)
    return pixel_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ccds", type=int, default=12)
    args = parser.parse_args()
    config = settings.load()
    unit = rfft2_unit()
    print(f"reference unit: rfft2 4096x4096 float32, 1 core = {unit:.3f} s")
    for compress in (False, True):
        with tempfile.TemporaryDirectory(dir=config.data_dir if config.data_dir.exists() else None) as tmp:
            root = Path(tmp) / "night"
            pixel_bytes = write_night(root, args.ccds, compress)
            first = next(root.rglob("*.fits"))
            started = time.perf_counter()
            raw = read_raw(first)
            read_s = time.perf_counter() - started
            started = time.perf_counter()
            amplifier_messages(raw.primary_header, raw.amplifiers(), 0.0)
            encode_s = time.perf_counter() - started
            stats = asyncio.run(replay([root], config.kafka_bootstrap, ReplayConfig(speed=None,
                                                                                   progress_interval=60)))
            label = "RICE_1 raw files" if compress else "uncompressed raw files"
            print(f"{label}: {args.ccds} full e2v CCDs ({pixel_bytes / 1e6:.0f} MB of int32 pixels)")
            print(f"  read one raw file       {read_s:.3f} s  ({read_s / unit:.1f} units)")
            print(f"  compress its 16 amps    {encode_s:.3f} s  ({encode_s / unit:.1f} units)")
            print(f"  replay                  {stats.seconds:.2f} s, {args.ccds / stats.seconds:.2f} CCD/s")
            print(f"  on the wire             {stats.bytes_sent / 1e6:.0f} MB, "
                  f"{stats.megabytes_per_second:.0f} MB/s")
            print(f"  raw pixel equivalent    {pixel_bytes / 1e6 / stats.seconds:.0f} MB/s "
                  f"(compression x{pixel_bytes / stats.bytes_sent:.1f})")


if __name__ == "__main__":
    main()
