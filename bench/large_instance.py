"""Memory for one large instance: how much the node's resident set grows while it receives it.

One multi-frame grayscale instance (default 1200 frames of 512x512 16-bit, 600 MB) is sent
with dcmtk's storescu to ``dicomnode serve``; prints the instance size, the node's peak
resident memory before and after (VmHWM) and their ratio (target: growth <= 0.1 of the
instance). The node writes data sets to disk as their fragments arrive, so the growth
should not scale with the instance.

    python3 bench/large_instance.py [--frames 1200] [--raw]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RawDataStorage,
    generate_uid,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.nodeutil import (  # noqa: E402
    NodeProcess,
    dataset_bytes,
    dcmtk,
    dcmtk_env,
    free_port,
    write_config,
)


def write_instance(path: Path, frames: int, raw: bool = False) -> int:
    """A multi-frame grayscale secondary capture instance of ``frames`` 512x512 frames, or
    (``raw``) a Raw Data object with as many bytes in a private element, as scanners keep
    their raw data (no pixel data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.PatientID = "OT", "BENCH"
    payload = np.random.default_rng(0).integers(
        0, 4096, (frames, 512, 512), dtype=np.uint16).tobytes()
    if raw:
        ds.SOPClassUID = RawDataStorage
        ds.private_block(0x0019, "DICOMNODE BENCH", create=True).add_new(0x10, "OB", payload)
    else:
        ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
        ds.Rows = ds.Columns = 512
        ds.NumberOfFrames = frames
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = payload
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def peak_rss(pid: int) -> int:
    """VmHWM of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1200)
    ap.add_argument("--raw", action="store_true",
                    help="a Raw Data object (private payload, no pixel data) of that size")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-large-"))
    try:
        size = write_instance(work / "large.dcm", args.frames, args.raw)
        port = free_port()
        config = write_config(work / "node.toml", port, work / "var", series_timeout=3600)
        node = NodeProcess(config, work / "node.log").start()
        try:
            before = peak_rss(node.proc.pid)
            start = time.perf_counter()
            subprocess.run([dcmtk("storescu"), "-aec", "HARMONISE", "127.0.0.1", str(port),
                            str(work / "large.dcm")], check=True, env=dcmtk_env(),
                           capture_output=True, timeout=600)
            seconds = time.perf_counter() - start
            after = peak_rss(node.proc.pid)
        finally:
            node.stop()
        [stored] = (work / "var" / "spool").rglob("*.dcm")
        assert dataset_bytes(stored) == dataset_bytes(work / "large.dcm"), "stored differs"
    finally:
        shutil.rmtree(work)
    mib = 2**20
    print(f"instance: {size / mib:.0f} MiB, received in {seconds:.1f} s")
    print(f"node peak resident memory: {before / mib:.0f} MiB before,"
          f" {after / mib:.0f} MiB after")
    print(f"growth / instance size: {(after - before) / size:.3f} (target <= 0.1)")


if __name__ == "__main__":
    main()
