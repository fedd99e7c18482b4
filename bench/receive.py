"""Receive throughput: dicomnode beside Orthanc and dcmtk's storescp, in one run.

Orthanc is the receiver a hospital would install instead of the node, and keeps the same
promise: it is started here on loopback with its defaults for durability (each file
fsynced, ``SyncStorageArea`` true, no compression, its SQLite index). storescp writes files
without fsync: the speed of a receiver that promises nothing. dcmtk's storescu sends to
each, fresh SOP Instance UIDs every round for every receiver (none ever sees a resend), in
two cases: ``--count`` images over one association, and ``--concurrent`` associations at
once with ``--per-association`` images each. Receivers take turns in a rotating order; the
medians of ``--rounds`` rounds and the ratios node/Orthanc and node/storescp are printed.

``--steps`` adds one pynetdicom SCP per step of the node's receive (``bench/noop_scp.py
--upto``: the data set received in memory, written to a file as it arrives, its header
checked and parsed, its digest taken, the file flushed into place), so the differences
between neighbours price each step, beside Orthanc's whole time per image.

    python3 bench/receive.py [--count 200] [--size 512] [--rounds 5] [--concurrent 4]
                             [--per-association 100] [--steps]
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.noop_scp import STEPS  # noqa: E402
from tests.dicom_factory import write_series  # noqa: E402
from tests.nodeutil import NodeProcess, dcmtk, dcmtk_env, free_port, wait_for, write_config  # noqa: E402,E501
from tests.orthanc import Orthanc  # noqa: E402

STEP_LABELS = {"nothing": "pynetdicom, in memory", "file": "+ written as it arrives",
               "parse": "+ header checked, parsed", "digest": "+ digest",
               "flush": "+ flushed into place"}


@dataclass
class Receiver:
    name: str
    port: int
    called: str
    stored: Callable[[], int]  # instances it holds now


def send(port: int, called: str, folders: list[Path]) -> float:
    """Seconds for one storescu per folder, all at once, each over one association."""
    start = time.perf_counter()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aec", called, "+sd", "-R", "127.0.0.1",
                               str(port), str(folder)], env=dcmtk_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for folder in folders]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def count_files(folder: Path, pattern: str = "*") -> Callable[[], int]:
    return lambda: sum(1 for p in folder.rglob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200, help="images over one association")
    ap.add_argument("--concurrent", type=int, default=4, help="associations at once")
    ap.add_argument("--per-association", type=int, default=100,
                    help="images per association in the concurrent case")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", action="store_true",
                    help="also price each step of the node's receive (one association)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    servers: list[subprocess.Popen[bytes]] = []
    node = NodeProcess(write_config(work / "node.toml", node_port := free_port(),
                                    work / "var", series_timeout=3600), work / "node.log")
    orthanc = Orthanc(work / "orthanc", aet="ORTHANC", verbose=False,
                      extra={"SyncStorageArea": True, "StorageCompression": False,
                             "DicomThreadsCount": 4})
    scp_port = free_port()
    (work / "storescp").mkdir()
    servers.append(subprocess.Popen([dcmtk("storescp"), "-od", str(work / "storescp"),
                                     str(scp_port)], env=dcmtk_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    receivers = [Receiver("dicomnode", node_port, "HARMONISE",
                          count_files(work / "var" / "spool", "*.dcm")),
                 Receiver("Orthanc", orthanc.dicom_port, "ORTHANC",
                          lambda: len(orthanc.instances())),
                 Receiver("storescp", scp_port, "ANY-SCP", count_files(work / "storescp"))]
    steps = STEPS if args.steps else ()
    for step in steps:
        port = free_port()
        servers.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("noop_scp.py")), str(port), "--upto",
             step, "--dir", str(work / f"noop-{step}")], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)}))
        receivers.append(Receiver(STEP_LABELS[step], port, "NOOP", lambda: 0))
    cases = {"one association": [args.count],
             f"{args.concurrent} associations": [args.per_association] * args.concurrent}
    rates: dict[tuple[str, str], list[float]] = {}
    seed = 0
    try:
        node.start()
        orthanc.start()
        for r in receivers:
            wait_for(lambda p=r.port, c=r.called: subprocess.run(
                [dcmtk("echoscu"), "-aec", c, "127.0.0.1", str(p)], env=dcmtk_env(),
                capture_output=True).returncode == 0, 30, what=r.name)
        for rnd in range(args.rounds):
            k = rnd % len(receivers)
            for receiver in receivers[k:] + receivers[:k]:
                for case, sizes in cases.items():
                    if receiver.called == "NOOP" and len(sizes) > 1:
                        continue  # the step table is for one association
                    folders = []
                    for n in sizes:
                        seed += 1
                        folders.append(work / f"in-{seed}")
                        write_series(folders[-1], slices=n, size=args.size, seed=seed)
                    before = receiver.stored()
                    seconds = send(receiver.port, receiver.called, folders)
                    total = sum(sizes)
                    if receiver.called != "NOOP":
                        wait_for(lambda r=receiver, b=before, t=total: r.stored() >= b + t, 60,
                                 what=f"{receiver.name} to hold what it acknowledged")
                    rates.setdefault((receiver.name, case), []).append(total / seconds)
                    for folder in folders:
                        shutil.rmtree(folder)
                    print(f"round {rnd + 1} {receiver.name:<26} {case:<16}"
                          f" {total / seconds:8.1f} images/s", flush=True)
    finally:
        if node.proc is not None:
            node.stop()
        orthanc.stop()
        for server in servers:
            server.terminate()
            server.wait(10)
    report(rates, cases, args, steps)
    shutil.rmtree(work)


def report(rates: dict[tuple[str, str], list[float]], cases: dict[str, list[int]],
           args: argparse.Namespace, steps: tuple[str, ...]) -> None:
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\nmedians of {args.rounds} rounds, {args.size}x{args.size} CT images,"
          f" {os.cpu_count()} cores:")
    for case in cases:
        node, orthanc = median[("dicomnode", case)], median[("Orthanc", case)]
        scp = median[("storescp", case)]
        print(f"{case:<16} node {node:7.1f}  Orthanc {orthanc:7.1f}  storescp {scp:7.1f}"
              f" images/s   node/Orthanc {node / orthanc:.2f}   node/storescp {node / scp:.2f}")
    if not steps:
        return
    case = "one association"
    print("\nper image, one association (differences of neighbours price each step):")
    previous = None
    for label in [*(STEP_LABELS[s] for s in steps), "dicomnode"]:
        ms = 1e3 / median[(label, case)]
        shown = "+ indexed, logged: the node" if label == "dicomnode" else label
        print(f"  {shown:<30} {ms:6.2f} ms"
              + ("" if previous is None else f"  ({ms - previous:+.2f} ms)"))
        previous = ms
    print(f"  {'Orthanc, the whole receive':<30} {1e3 / median[('Orthanc', case)]:6.2f} ms")


if __name__ == "__main__":
    main()
