"""``dicomnode simulate``: write a synthetic CT or MR series of one virtual scanner domain."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dicomnode.errors import UserError
from dicomnode.log import configure
from pipelines.errors import one_line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="write a synthetic DICOM series of a virtual scanner",
        description="Simulate one CT or MR series of a scanner domain (vendor, kernel or "
        "sequence). The same --subject/--seed with another --domain gives the same anatomy "
        "and slice geometry: a ground-truth pair for harmonisation.",
        epilog="example: dicomnode simulate --modality CT --domain siemens-b70f --out sim/b70f "
        "--size 256 --slices 16 --preview sim/ct.png;  dicomnode simulate --list")
    p.add_argument("--list", action="store_true", help="list the domains and their key tags")
    p.add_argument("--modality", choices=["CT", "MR"], type=str.upper, help="CT or MR")
    p.add_argument("--domain", help="scanner domain name (see --list)")
    p.add_argument("--out", type=Path, help="output folder for the series")
    p.add_argument("--subject", type=int, default=0, help="subject number (anatomy; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject population")
    p.add_argument("--slices", type=int, default=32, help="number of slices (default 32)")
    p.add_argument("--size", type=int, help="matrix size (default CT 512, MR 256)")
    p.add_argument("--phantom", choices=["chest", "head"], default="chest",
                   help="CT anatomy: procedural chest or head phantom (default chest)")
    p.add_argument("--volume", type=Path,
                   help="CT anatomy from your own volume in HU (NIfTI file or DICOM folder)")
    p.add_argument("--enhanced", action="store_true",
                   help="one Enhanced CT/MR multi-frame instance instead of one file per slice")
    p.add_argument("--jpeg2000", action="store_true", help="JPEG 2000 lossless pixel data")
    p.add_argument("--noise-seed", type=int, default=0,
                   help="another noise realisation of the same acquisition")
    p.add_argument("--preview", type=Path, metavar="PNG",
                   help="also save the middle slice across all domains of the modality with"
                   " difference maps")
    p.set_defaults(func=run)


def _list() -> int:
    from trainers.simulation import DOMAINS, key_tags
    for name, domain in DOMAINS.items():
        tags = "  ".join(f"{k}={v}" for k, v in key_tags(domain).items())
        print(f"{name:<16} {tags}")
    return 0


def run(args: argparse.Namespace) -> int:
    from trainers.simulation import simulate_series
    if args.list:
        return _list()
    configure("warning" if args.preview else "info")     # JSON lines on stderr
    missing = [f"--{k}" for k in ("modality", "domain", "out") if getattr(args, k) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} required (or --list)")
    if args.volume is not None and not args.volume.exists():
        raise UserError(f"--volume {args.volume}: no such file or folder")
    if args.volume is not None and args.modality != "CT":
        raise UserError("--volume is CT anatomy; MR anatomy is the MNI brain")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a folder")
    common = dict(subject=args.subject, slices=args.slices, size=args.size, seed=args.seed,
                  phantom=args.phantom, volume=args.volume)
    try:
        paths = simulate_series(args.modality, args.domain, args.out, enhanced=args.enhanced,
                                jpeg2000=args.jpeg2000, noise_seed=args.noise_seed, **common)
        if args.preview:
            _preview(args, common)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    except (RuntimeError, OSError) as exc:  # e.g. SimpleITK cannot read --volume, disk full
        raise UserError(one_line(exc)) from exc
    print(f"wrote {len(paths)} file(s) of {args.domain} to {args.out}")
    return 0


def _preview(args: argparse.Namespace, common: dict) -> None:
    """Simulate the middle slices of every domain of the modality into a scratch folder."""
    from trainers.simulation import DOMAINS, simulate_series
    from trainers.simulation.preview import read_series, save_preview
    names = [args.domain] + [n for n, d in DOMAINS.items()
                             if d.modality == args.modality and n != args.domain]
    with tempfile.TemporaryDirectory() as tmp:
        series = {name: read_series(simulate_series(
            args.modality, name, Path(tmp) / name, enhanced=True, **common)) for name in names}
    save_preview(series, args.preview, modality=args.modality)
    print(f"preview: {args.preview}")
