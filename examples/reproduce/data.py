"""Prepares the reproduction study's data: real English text, byte-level tokens, a fixed split.

    python examples/reproduce/data.py                     # Debian's linux-doc-6.1 -> examples/reproduce/data/
    python examples/reproduce/data.py --deb linux-doc-6.1_6.1.192-2_all.deb   # a .deb already downloaded
    python examples/reproduce/data.py --from-dir DIR --out OUT                # any folder of text (tests)

Source: the Linux kernel documentation as Debian ships it in the package ``linux-doc-6.1``
(``apt-get download linux-doc-6.1``, unpacked with ``dpkg-deb -x``; needs a Debian/Ubuntu machine
that can reach a Debian archive, i.e. a CPU machine, not the GPU machine). Text written by the
kernel's authors, none of it by this project.

What is kept: every ``Documentation/**/*.rst`` and ``*.txt`` file (Debian gzips them; they are
decompressed), except ``Documentation/translations/`` (not English). Files are taken in the
sorted order of their paths relative to ``Documentation/`` (Python's ``sorted`` on the POSIX path
strings), each file's bytes as they are (NUL bytes removed, counted in the manifest), every file
followed by one NUL byte (0x00), the end-of-document token.

Tokens: bytes (vocabulary 256, nothing to download or train). Split: a file goes to the held-out
set when the first 8 hex digits of sha256(its relative path) taken as an integer, modulo 10000,
is below ``val_fraction * 10000`` (default 5%): deterministic, independent of the file order and
of the package version for files that keep their names, and whole files (no document is split
between train and held-out).

Outputs in --out (git-ignored): ``train.bin`` and ``val.bin`` (uint8, one byte a token) and
``manifest.json`` (source package, version, the .deb's sha256, the outputs' sha256, token and file
counts, the rules above). The manifest is also copied to ``examples/reproduce/data_manifest.json``
(committed) unless --no-commit-manifest; run.py records the manifest's sha256s in its results,
which ties every result to these exact bytes. Re-running with the same package version gives the
same bytes; when the committed manifest names the same version and the outputs differ, the script
says so (exit code 2).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "data"
COMMITTED_MANIFEST = HERE / "data_manifest.json"
PACKAGE = "linux-doc-6.1"
EOD = 0  # end-of-document byte
SUFFIXES = (".rst", ".txt")
EXCLUDE_PREFIXES = ("translations/",)
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_val(rel: str, val_fraction: float) -> bool:
    """The held-out rule: a hash of the file's relative path (whole files, deterministic)."""
    return int(hashlib.sha256(rel.encode("utf-8")).hexdigest()[:8], 16) % 10000 < round(val_fraction * 10000)


def text_files(root: Path) -> List[Tuple[str, Path]]:
    """(relative POSIX path without .gz, file) of every kept text file under root, sorted by path."""
    out = []
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        name = rel[:-3] if rel.endswith(".gz") else rel
        if not name.endswith(SUFFIXES) or name.startswith(EXCLUDE_PREFIXES):
            continue
        out.append((name, p))
    out.sort(key=lambda t: t[0])
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1} if len(set(names)) != len(names) else set()
    if dup:
        raise SystemExit(f"both a file and its .gz exist for: {sorted(dup)[:5]}")
    return out


def read_text(p: Path) -> bytes:
    data = p.read_bytes()
    return gzip.decompress(data) if p.name.endswith(".gz") else data


def build_corpus(root: Path, val_fraction: float) -> Tuple[bytes, bytes, Dict]:
    """The train and held-out byte streams of the text files under root, and their statistics."""
    files = text_files(root)
    if not files:
        raise SystemExit(f"{root}: no {'/'.join(SUFFIXES)} files found")
    parts = {"train": [], "val": []}
    stats = {"train": {"files": 0, "tokens": 0}, "val": {"files": 0, "tokens": 0}, "nul_bytes_removed": 0}
    for rel, p in files:
        text = read_text(p)
        nul = text.count(b"\x00")
        if nul:
            stats["nul_bytes_removed"] += nul
            text = text.replace(b"\x00", b"")
        split = "val" if is_val(rel, val_fraction) else "train"
        parts[split].append(text + bytes([EOD]))
        stats[split]["files"] += 1
        stats[split]["tokens"] += len(text) + 1
    return b"".join(parts["train"]), b"".join(parts["val"]), stats


def write_dataset(train: bytes, val: bytes, stats: Dict, out: Path, source: Dict, val_fraction: float) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")  # prepared data is never committed (its manifest is)
    if len(val) == 0 or len(train) == 0:
        raise SystemExit(f"empty split (train {len(train)} bytes, val {len(val)} bytes): too few files")
    for name, blob in (("train.bin", train), ("val.bin", val)):
        tmp = out / (name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, out / name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "tokenizer": {"kind": "bytes", "vocab_size": 256, "eod_token": EOD},
        "selection": {"suffixes": list(SUFFIXES), "root": source.get("root", "."),
                      "exclude_prefixes": list(EXCLUDE_PREFIXES), "order": "sorted relative POSIX paths (.gz stripped)",
                      "separator": "one EOD byte (0x00) after every file; NUL bytes inside files removed"},
        "split": {"rule": "val when int(sha256(relative_path)[:8], 16) % 10000 < val_fraction * 10000",
                  "val_fraction": val_fraction},
        "files": {"train": stats["train"]["files"], "val": stats["val"]["files"]},
        "nul_bytes_removed": stats["nul_bytes_removed"],
        "outputs": {
            "train.bin": {"tokens": len(train), "sha256": hashlib.sha256(train).hexdigest()},
            "val.bin": {"tokens": len(val), "sha256": hashlib.sha256(val).hexdigest()},
        },
        "total_bytes": len(train) + len(val),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def download_deb(package: str, version: Optional[str], workdir: Path) -> Path:
    spec = f"{package}={version}" if version else package
    print(f"apt-get download {spec}", flush=True)
    r = subprocess.run(["apt-get", "download", spec], cwd=workdir, capture_output=True, text=True)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if r.returncode != 0 or not debs:
        raise SystemExit(
            f"apt-get download {spec} failed (exit {r.returncode}):\n{r.stderr.strip()}\n"
            "This needs a Debian/Ubuntu machine whose apt sources carry the package (Debian 12 'bookworm' "
            "and its security updates do); or download the .deb elsewhere and pass --deb FILE."
        )
    return debs[0]


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True).stdout.strip()


def prepare_from_deb(deb: Path, out: Path, val_fraction: float) -> Dict:
    package, version = deb_field(deb, "Package"), deb_field(deb, "Version")
    with tempfile.TemporaryDirectory(prefix="reproduce-data-") as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp) / "usr" / "share" / "doc" / package / "Documentation"
        if not root.is_dir():
            raise SystemExit(f"{deb.name}: no usr/share/doc/{package}/Documentation inside")
        train, val, stats = build_corpus(root, val_fraction)
    source = {"kind": "debian-package", "package": package, "version": version, "deb": deb.name,
              "deb_sha256": sha256_file(deb), "deb_bytes": deb.stat().st_size,
              "root": f"usr/share/doc/{package}/Documentation",
              "obtain": f"apt-get download {package}={version} && dpkg-deb -x {deb.name} DIR"}
    return write_dataset(train, val, stats, out, source, val_fraction)


def prepare_from_dir(src: Path, out: Path, val_fraction: float) -> Dict:
    train, val, stats = build_corpus(src, val_fraction)
    source = {"kind": "directory", "path": str(src), "root": "."}
    return write_dataset(train, val, stats, out, source, val_fraction)


def check_against_committed(manifest: Dict, committed: Path) -> int:
    """0: no committed manifest, or it describes another source; 1: same outputs; 2: same source, other bytes."""
    if not committed.exists():
        return 0
    old = json.loads(committed.read_text())
    same_source = (old.get("source", {}).get("package"), old.get("source", {}).get("version")) == (
        manifest["source"].get("package"), manifest["source"].get("version"))
    if not same_source:
        return 0
    if old.get("outputs") == manifest["outputs"]:
        return 1
    return 2


def load_manifest(data_dir: Path) -> Dict:
    return json.loads((Path(data_dir) / "manifest.json").read_text())


def verify(data_dir: Path) -> Dict:
    """Checks train.bin/val.bin against the manifest beside them; returns the manifest."""
    manifest = load_manifest(data_dir)
    for name, info in manifest["outputs"].items():
        p = Path(data_dir) / name
        if not p.exists():
            raise SystemExit(f"{p}: missing (run examples/reproduce/data.py)")
        if p.stat().st_size != info["tokens"] or sha256_file(p) != info["sha256"]:
            raise SystemExit(f"{p}: does not match {data_dir}/manifest.json (size or sha256); re-run data.py")
    return manifest


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--package", default=PACKAGE)
    ap.add_argument("--version", help="pin the package version (default: apt's candidate; the committed "
                    "manifest names the one the results used)")
    ap.add_argument("--deb", type=Path, help="use this .deb instead of downloading")
    ap.add_argument("--from-dir", type=Path, help="prepare from a folder of .rst/.txt files instead (tests)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--no-commit-manifest", action="store_true",
                    help=f"do not copy the manifest to {COMMITTED_MANIFEST.name}")
    ap.add_argument("--verify", action="store_true", help="only check --out against its manifest")
    args = ap.parse_args(argv)

    if args.verify:
        m = verify(args.out)
        print(f"{args.out}: OK ({m['outputs']['train.bin']['tokens']} train, {m['outputs']['val.bin']['tokens']} val tokens)")
        return 0
    if args.from_dir:
        manifest = prepare_from_dir(args.from_dir, args.out, args.val_fraction)
        commit = False
    else:
        if args.deb:
            manifest = prepare_from_deb(args.deb, args.out, args.val_fraction)
        else:
            with tempfile.TemporaryDirectory(prefix="reproduce-deb-") as tmp:
                deb = download_deb(args.package, args.version, Path(tmp))
                manifest = prepare_from_deb(deb, args.out, args.val_fraction)
        commit = not args.no_commit_manifest
    o = manifest["outputs"]
    print(f"{manifest['source'].get('package', manifest['source'].get('path'))} "
          f"{manifest['source'].get('version', '')}: {manifest['files']['train']} train files, "
          f"{manifest['files']['val']} held-out files; train.bin {o['train.bin']['tokens']:,} tokens, "
          f"val.bin {o['val.bin']['tokens']:,} tokens -> {args.out}")
    status = check_against_committed(manifest, COMMITTED_MANIFEST) if commit else 0
    if status == 2:
        print(f"ERROR: {COMMITTED_MANIFEST.name} names the same package version but other output bytes; "
              "the committed results were made from other data. Not overwriting it.", file=sys.stderr)
        return 2
    if status == 1:
        print(f"outputs identical to {COMMITTED_MANIFEST.name}")
    if commit and status != 1:
        shutil.copyfile(args.out / "manifest.json", COMMITTED_MANIFEST)
        print(f"manifest copied to {COMMITTED_MANIFEST} (commit it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
