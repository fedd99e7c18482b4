"""The web console's series list and QIDO-RS at SERIES level over a large index.

Fills an index with ``--series`` series (default 100,000; ``--instances`` each, in ~10
series per study, CT and MR, spread over 30 days, a tenth failed) through
:func:`dicomnode.store.bulk.insert`, serves it with the node's own web app and server
(uvicorn, as ``dicomnode serve`` does), and times each request over HTTP: the median and
the slowest of ``--repeat`` after one warm-up. Target: <= 200 ms for the series list and
for QIDO-RS at SERIES and STUDY level.

    python3 bench/web.py [--series 100000] [--instances 2] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomnode.config import load_config  # noqa: E402
from dicomnode.log import configure  # noqa: E402
from dicomnode.store import bulk  # noqa: E402
from dicomnode.store.index import Index, InstanceRecord, SeriesState  # noqa: E402
from dicomnode.web.app import build_app  # noqa: E402
from dicomnode.web.server import WebServer  # noqa: E402

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DAY = 86400.0


def rows(series: int, instances: int, start: float):
    """Synthetic instances: series ``n`` of study ``n // 10``, received in order."""
    for n in range(series):
        ct = n % 3 != 0
        study, uid = f"1.2.826.0.1.3680043.99.1.{n // 10}", f"1.2.826.0.1.3680043.99.2.{n}"
        state = SeriesState.FAILED if n % 10 == 7 else SeriesState.HARMONISED
        received = start + n * (30 * DAY / series)
        for i in range(instances):
            attrs = {"PatientID": f"P{n // 40}", "PatientName": f"Test^{n // 40}",
                     "StudyInstanceUID": study, "SeriesInstanceUID": uid,
                     "SOPInstanceUID": f"{uid}.{i + 1}", "SOPClassUID":
                     CT_IMAGE if ct else MR_IMAGE, "Modality": "CT" if ct else "MR",
                     "SeriesNumber": n % 10 + 1, "InstanceNumber": i + 1,
                     "SeriesDescription": "Thorax B70f" if ct else "AX T1 SE",
                     "StudyDate": time.strftime("%Y%m%d", time.gmtime(received)),
                     "Manufacturer": "SIEMENS" if ct else "GE MEDICAL SYSTEMS"}
            record = InstanceRecord(f"{uid}.{i + 1}", attrs["SOPClassUID"], uid, study,
                                    "1.2.840.10008.1.2.1", attrs["Modality"], i + 1, attrs)
            yield bulk.BulkInstance(record, received + i, state,
                                    "ct-sharp-to-smooth" if ct else None)


def timed(url: str, repeat: int) -> tuple[float, float, int]:
    """Median and slowest milliseconds of ``repeat`` GETs (after one), and the body size."""
    def get() -> int:
        with urllib.request.urlopen(url, timeout=60) as response:
            return len(response.read())
    size = get()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        get()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=2, help="instances per series")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--port", type=int, default=18480)
    args = parser.parse_args()
    configure("warning")
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        conf = Path(tmp) / "node.toml"
        conf.write_text(f'[node]\nport = {args.port + 1}\ndata_dir = "{tmp}/var"\n'
                        f'[web]\nport = {args.port}\n'
                        '[[routes]]\nname = "ct-sharp-to-smooth"\nmodel = "none"\n'
                        '[routes.match]\nModality = "CT"\n')
        config = load_config(conf)
        index = Index(config.index_path)
        start = time.time() - 31 * DAY
        began = time.perf_counter()
        total = bulk.insert(index, tqdm(rows(args.series, args.instances, start),
                                        total=args.series * args.instances, unit="instance",
                                        desc="indexing", mininterval=2))
        print(f"indexed {args.series:,} series ({total:,} instances) in"
              f" {time.perf_counter() - began:.1f} s")
        server = WebServer(config)
        server.bind()
        server.start(build_app(config, index, lambda: True), grace=1)
        base = f"http://127.0.0.1:{args.port}"
        middle = f"1.2.826.0.1.3680043.99.1.{args.series // 20}"
        day = time.strftime("%Y-%m-%d", time.gmtime(start + 15 * DAY))
        week = "-".join(time.strftime("%Y%m%d", time.gmtime(start + d * DAY)) for d in (10, 16))
        cases = [
            ("series list, first page", "/series"),
            ("series list, state=failed", "/series?state=failed"),
            ("series list, modality=MR, kind=original", "/series?modality=MR&kind=original"),
            ("series list, route", "/series?route=ct-sharp-to-smooth"),
            ("series list, one received day", f"/series?from={day}&to={day}"),
            ("series list, a page 1,000 pages in",
             "/series?after=" + f"{start + (args.series - 50_000) * 30 * DAY / args.series!r}"
             f"_1.2.826.0.1.3680043.99.2.{args.series - 50_000}"),
            ("QIDO-RS /series?limit=100", "/dicomweb/series?limit=100"),
            ("QIDO-RS /series (no limit: the default, 100)", "/dicomweb/series"),
            ("QIDO-RS /series?limit=1000 (the maximum)", "/dicomweb/series?limit=1000"),
            ("QIDO-RS /series?Modality=MR&limit=100", "/dicomweb/series?Modality=MR&limit=100"),
            ("QIDO-RS /series?StudyDate=<a day>&limit=100",
             f"/dicomweb/series?StudyDate={day.replace('-', '')}&limit=100"),
            ("QIDO-RS /series?StudyDate=<a week>&limit=100",
             f"/dicomweb/series?StudyDate={week}&limit=100"),
            ("QIDO-RS /series?StudyDate=<no such day>", "/dicomweb/series?StudyDate=19990101"),
            ("QIDO-RS /series?PatientName=test^1*&limit=100",
             "/dicomweb/series?PatientName=test%5E1*&limit=100"),
            ("QIDO-RS /studies/{uid}/series", f"/dicomweb/studies/{middle}/series"),
            ("QIDO-RS /series?SeriesInstanceUID=<uid>",
             f"/dicomweb/series?SeriesInstanceUID=1.2.826.0.1.3680043.99.2.{args.series // 2}"),
            ("QIDO-RS /studies?limit=100", "/dicomweb/studies?limit=100"),
            ("QIDO-RS /studies?limit=100&offset=5000",
             "/dicomweb/studies?limit=100&offset=5000"),
            ("QIDO-RS /studies?StudyDate=<a day>&limit=100",
             f"/dicomweb/studies?StudyDate={day.replace('-', '')}&limit=100"),
            ("QIDO-RS /studies?StudyDate=<a week>&ModalitiesInStudy=MR&limit=25&offset=25",
             f"/dicomweb/studies?StudyDate={week}&ModalitiesInStudy=MR&limit=25&offset=25"),
            ("QIDO-RS /studies?PatientID=P12*", "/dicomweb/studies?PatientID=P12*"),
            ("QIDO-RS /studies?PatientName=test^1*&limit=100",
             "/dicomweb/studies?PatientName=test%5E1*&limit=100"),
            ("QIDO-RS /studies?StudyDate=<no such day>", "/dicomweb/studies?StudyDate=19990101"),
        ]
        print(f"{'request':<76} {'median ms':>10} {'max ms':>8} {'bytes':>9}")
        for name, path in cases:
            median, slowest, size = timed(base + path, args.repeat)
            print(f"{name:<76} {median:>10.1f} {slowest:>8.1f} {size:>9,}")
        server.stop()
        index.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
