"""Receive throughput: dicomnode vs dcmtk's storescp, side by side in one run.

N CT instances (default 500 at 512x512) are sent with dcmtk's storescu to dcmtk's
storescp (writing files), to ``dicomnode serve`` and to a pynetdicom SCP that stores
nothing (``bench/noop_scp.py``, the floor any pynetdicom node sits on), rotating the order
over several rounds with fresh UIDs each time. Prints images/s of each and the ratios
(target: node/storescp >= 0.9).

Note what is compared: storescp writes files without fsync; the node fsyncs each file and
its folder and commits its index row before answering Success.

    python3 bench/receive.py [--count 500] [--size 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
    noop_port = free_port()
    noop = subprocess.Popen([sys.executable, str(Path(__file__).with_name("noop_scp.py")),
                             str(noop_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    config = write_config(work / "node.toml", node_port, work / "var", series_timeout=3600)
    node = NodeProcess(config, work / "node.log")
    node.start()
    rates: dict[str, list[float]] = {"storescp": [], "dicomnode": [], "pynetdicom": []}
    try:
        for port, what in ((scp_port, "storescp"), (noop_port, "no-op pynetdicom SCP")):
            wait_for(lambda p=port: subprocess.run(
                [dcmtk("echoscu"), "-aec", "NOOP", "127.0.0.1", str(p)], env=dcmtk_env(),
                capture_output=True).returncode == 0, 10, what=what)
        contenders = [("storescp", scp_port, "ANY-SCP"), ("dicomnode", node_port, "HARMONISE"),
                      ("pynetdicom", noop_port, "NOOP")]
        for r in range(args.rounds):
            k = r % len(contenders)
            for name, port, called in contenders[k:] + contenders[:k]:
                folder = work / f"in-{name}-{r}"
                write_series(folder, slices=args.count, size=args.size, seed=r)
                seconds = send(port, folder, called)
                rates[name].append(args.count / seconds)
                shutil.rmtree(folder)
                print(f"round {r + 1} {name:<10}: {args.count / seconds:8.1f} images/s"
                      f" ({seconds:.2f} s)", flush=True)
    finally:
        node.stop()
        for server in (scp, noop):
            server.terminate()
            server.wait(10)
    stored = len(list((work / "var" / "spool").rglob("*.dcm")))
    assert stored == args.count * args.rounds, f"node stored {stored} files"
    shutil.rmtree(work)
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, rate in median.items():
        print(f"{name:<10}: {rate:8.1f} images/s (median of {args.rounds})")
    print(f"ratio node/storescp: {median['dicomnode'] / median['storescp']:.2f}"
          " (target >= 0.9)")
    print(f"ratio no-op pynetdicom/storescp: {median['pynetdicom'] / median['storescp']:.2f}"
          " (the most a pynetdicom node could reach)")
    print(f"ratio node/no-op pynetdicom: {median['dicomnode'] / median['pynetdicom']:.2f}")


if __name__ == "__main__":
    main()
