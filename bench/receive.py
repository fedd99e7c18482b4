"""Receive throughput: dicomnode vs dcmtk's storescp, side by side in one run.

N CT instances (default 500 at 512x512) are sent with dcmtk's storescu to dcmtk's
storescp (writing files) and to ``dicomnode serve``, alternating over several rounds with
fresh UIDs each time. Prints images/s of each, and the ratio (target: node/storescp >= 0.9).

Note what is compared: storescp writes files without fsync; the node fsyncs each file and
its folder and commits its index row before answering Success.

    python3 bench/receive.py [--count 500] [--size 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.dicom_factory import write_series  # noqa: E402
from tests.nodeutil import (  # noqa: E402
    NodeProcess,
    dcmtk,
    dcmtk_env,
    free_port,
    wait_for,
    write_config,
)


def send(port: int, folder: Path, called: str) -> float:
    """Seconds for one storescu association sending every file in ``folder``."""
    start = time.perf_counter()
    subprocess.run([dcmtk("storescu"), "-aec", called, "+sd", "-R", "127.0.0.1", str(port),
                    str(folder)], check=True, timeout=1800, env=dcmtk_env(),
                   capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    scp_port, node_port = free_port(), free_port()
    scp_dir = work / "storescp"
    scp_dir.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-od", str(scp_dir), str(scp_port)],
                           env=dcmtk_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    config = write_config(work / "node.toml", node_port, work / "var", series_timeout=3600)
    node = NodeProcess(config, work / "node.log")
    node.start()
    rates: dict[str, list[float]] = {"storescp": [], "dicomnode": []}
    try:
        wait_for(lambda: subprocess.run([dcmtk("echoscu"), "127.0.0.1", str(scp_port)],
                                        env=dcmtk_env(), capture_output=True).returncode == 0,
                 10, what="storescp")
        for r in range(args.rounds):
            order = [("storescp", scp_port, "ANY-SCP"), ("dicomnode", node_port, "HARMONISE")]
            for name, port, called in order if r % 2 == 0 else order[::-1]:
                folder = work / f"in-{name}-{r}"
                write_series(folder, slices=args.count, size=args.size, seed=r)
                seconds = send(port, folder, called)
                rates[name].append(args.count / seconds)
                shutil.rmtree(folder)
                print(f"round {r + 1} {name:<9}: {args.count / seconds:8.1f} images/s"
                      f" ({seconds:.2f} s)", flush=True)
    finally:
        node.stop()
        scp.terminate()
        scp.wait(10)
    stored = len(list((work / "var" / "spool").rglob("*.dcm")))
    assert stored == args.count * args.rounds, f"node stored {stored} files"
    shutil.rmtree(work)
    scp_rate = statistics.median(rates["storescp"])
    node_rate = statistics.median(rates["dicomnode"])
    print(f"storescp : {scp_rate:8.1f} images/s (median of {args.rounds})")
    print(f"dicomnode: {node_rate:8.1f} images/s (median of {args.rounds})")
    print(f"ratio node/storescp: {node_rate / scp_rate:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
