"""Receive throughput: dicomnode vs dcmtk's storescp, side by side in one run.

N CT instances (default 500 at 512x512) are sent with dcmtk's storescu to dcmtk's
storescp (writing files), to ``dicomnode serve`` and to a pynetdicom SCP that stores
nothing (``bench/noop_scp.py``, the floor any pynetdicom node sits on), rotating the order
over several rounds with fresh UIDs each time. Prints images/s of each and the ratios
(target: node/storescp >= 0.9).

Note what is compared: storescp writes files without fsync; the node fsyncs each file and
its folder and commits its index row before answering Success. So the run also measures
storescp receiving without storing (``--ignore``: the cheapest receive there is) and, in
process, the node's durable store alone (the instance's file made durable and its index
row committed, nothing parsed): storescu waits for each response before it sends the next
image, so no receiver that keeps the node's guarantee takes less time per image than the
two together, which bounds the ratio any such node could reach. (One that wrote each PDU
to disk as it arrived could hide the copy into the page cache, a fifth of the durable
store here, but not the flushes.)

``--steps`` adds one such pynetdicom SCP per step of the node's receive (the data set written
to a file as it arrives, its header parsed, its digest taken, the file flushed into place;
``bench/noop_scp.py --upto``), so the differences between neighbours price each step and
the last one's difference to the node is its indexing and logging.

    python3 bench/receive.py [--count 500] [--size 512] [--rounds 3] [--per-association]
                             [--steps]
"""

from __future__ import annotations

import argparse
import hashlib
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

from bench.noop_scp import STEPS  # noqa: E402
from dicomnode.store.files import instance_path, store_bytes  # noqa: E402
from dicomnode.store.index import Index  # noqa: E402
from dicomnode.store.ingest import parse_header  # noqa: E402
from tests.dicom_factory import write_series  # noqa: E402
from tests.nodeutil import (  # noqa: E402
    NodeProcess,
    dcmtk,
    dcmtk_env,
    free_port,
    wait_for,
    write_config,
)


def send(port: int, folder: Path, called: str, per_association: bool = False) -> float:
    """Seconds for storescu to send every file in ``folder``: over one association, or
    (``per_association``) one association per file, as many modalities send."""
    batches = [[p] for p in sorted(folder.iterdir())] if per_association else [[folder]]
    start = time.perf_counter()
    for batch in batches:
        subprocess.run([dcmtk("storescu"), "-aec", called, "+sd", "-R", "127.0.0.1", str(port),
                        *map(str, batch)], check=True, timeout=1800, env=dcmtk_env(),
                       capture_output=True)
    return time.perf_counter() - start


def durable_store_rate(folder: Path, data_dir: Path) -> float:
    """Images/s of the node's durable store alone, in process: each file of ``folder``
    written durably into a spool and indexed (as ``receive_instance`` does after parsing)."""
    index = Index(data_dir / "index.sqlite3")
    spool = data_dir / "spool"
    items = []
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        record = parse_header(data)
        items.append((data, record, hashlib.sha256(data).hexdigest(),
                      instance_path(spool, record.study_uid, record.series_uid,
                                    record.sop_instance_uid)))
    start = time.perf_counter()
    for data, record, sha256, target in items:
        store_bytes(target, data, sha256)
        index.add_instance(record, str(target.relative_to(data_dir)), len(data), sha256)
    seconds = time.perf_counter() - start
    index.close()
    return len(items) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-association", action="store_true",
                    help="one association per instance (a storescu run each), as many"
                         " modalities send: adds association set-up to every image")
    ap.add_argument("--steps", action="store_true",
                    help="also price each step of the node's receive with a pynetdicom SCP"
                         " stopping after it (bench/noop_scp.py --upto)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    scp_port, node_port, ignore_port = free_port(), free_port(), free_port()
    scp_dir = work / "storescp"
    scp_dir.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-od", str(scp_dir), str(scp_port)],
                           env=dcmtk_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    ignore = subprocess.Popen([dcmtk("storescp"), "--ignore", str(ignore_port)],
                              env=dcmtk_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    steps = STEPS if args.steps else STEPS[:1]
    noop_ports = {step: free_port() for step in steps}
    noops = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("noop_scp.py")),
                               str(port), "--upto", step, "--dir", str(work / f"noop-{step}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
             for step, port in noop_ports.items()]
    config = write_config(work / "node.toml", node_port, work / "var", series_timeout=3600)
    node = NodeProcess(config, work / "node.log")
    noop_names = {step: "pynetdicom" if step == "nothing" else f"+{step}" for step in steps}
    contenders = [("storescp", scp_port, "ANY-SCP"), ("dicomnode", node_port, "HARMONISE"),
                  *((noop_names[step], port, "NOOP") for step, port in noop_ports.items()),
                  ("receive-only", ignore_port, "ANY-SCP")]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    rates["durable store"] = []
    try:
        node.start()  # inside: the peers above are stopped whatever happens
        for port, what in ((scp_port, "storescp"), (ignore_port, "storescp --ignore"),
                           *((p, f"pynetdicom SCP --upto {s}") for s, p in noop_ports.items())):
            wait_for(lambda p=port: subprocess.run(
                [dcmtk("echoscu"), "-aec", "NOOP", "127.0.0.1", str(p)], env=dcmtk_env(),
                capture_output=True).returncode == 0, 10, what=what)
        for r in range(args.rounds):
            k = r % len(contenders)
            for name, port, called in contenders[k:] + contenders[:k]:
                folder = work / f"in-{name}-{r}"
                write_series(folder, slices=args.count, size=args.size, seed=r)
                seconds = send(port, folder, called, args.per_association)
                rates[name].append(args.count / seconds)
                shutil.rmtree(folder)
                print(f"round {r + 1} {name:<13}: {args.count / seconds:8.1f} images/s"
                      f" ({seconds:.2f} s)", flush=True)
            folder = work / f"in-durable-{r}"
            write_series(folder, slices=args.count, size=args.size, seed=100 + r)
            rates["durable store"].append(durable_store_rate(folder, work / f"durable-{r}"))
            shutil.rmtree(folder)
            print(f"round {r + 1} durable store: {rates['durable store'][-1]:8.1f} images/s"
                  " (in process)", flush=True)
    finally:
        if node.proc is not None:
            node.stop()
        for server in (scp, ignore, *noops):
            server.terminate()
            server.wait(10)
    stored = len(list((work / "var" / "spool").rglob("*.dcm")))
    assert stored == args.count * args.rounds, f"node stored {stored} files"
    shutil.rmtree(work)
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, rate in median.items():
        print(f"{name:<13}: {rate:8.1f} images/s (median of {args.rounds})")
    print(f"ratio node/storescp: {median['dicomnode'] / median['storescp']:.2f}"
          " (target >= 0.9)")
    print(f"ratio no-op pynetdicom/storescp: {median['pynetdicom'] / median['storescp']:.2f}"
          " (the most a pynetdicom node could reach)")
    print(f"ratio node/no-op pynetdicom: {median['dicomnode'] / median['pynetdicom']:.2f}")
    if args.steps:
        print("per image, each step of the node's receive (differences of neighbours):")
        labels = {"pynetdicom": "pynetdicom, in memory", "dicomnode": "+index and log (the node)"}
        previous = None
        for name in [*noop_names.values(), "dicomnode"]:
            ms = 1e3 / median[name]
            print(f"  {labels.get(name, name):<26}: {ms:6.2f} ms"
                  + ("" if previous is None else f" ({ms - previous:+.2f} ms)"))
            previous = ms
    bound = 1.0 / (1.0 / median["receive-only"] + 1.0 / median["durable store"])
    print(f"bound: storescp's receive alone plus the node's durable store alone give"
          f" {bound:.1f} images/s = {bound / median['storescp']:.2f} of storescp (the most any"
          " receiver that keeps the node's guarantee could reach here)")


if __name__ == "__main__":
    main()
