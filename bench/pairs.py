#!/usr/bin/env python3
"""Benchmark pairs (OLD, NEW) from real software, built reproducibly.

Each pair is an ext4 image holding a Python tree: this interpreter's standard library
(without its tests and site-packages) and a set of packages from PyPI at pinned
released versions. NEW is OLD with the packages upgraded in place, as a package
manager does it on a device: the old versions' files removed, the new versions
unpacked (`pip install --no-deps --target`), on the mounted filesystem.

    python bench/pairs.py                  # build every pair (cached), print paths
    python bench/pairs.py --pair binary    # one pair

Kinds:
  binary   four binary-heavy packages (shared libraries, extension modules) get a
           minor release each: the issue's case;
  text     text-heavy packages (botocore's JSON service models, Django, sympy) get a
           patch release each: many small files, little machine code.

Wheels are downloaded once into the cache directory (`pip download`, pinned
versions, manylinux x86_64 for CPython 3.11), images are built once and reused while
the recipe is unchanged (the recipe's hash names them). The filesystem is made with
a fixed UUID and hash seed; file timestamps differ between builds, so two builds are
alike in layout and contents, not byte for byte. Needs root (loop mounts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import attached, require_root, run, scratch_dir  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("FUSESNAP_BENCH_CACHE", "/var/tmp/fusesnap-bench"))
IMAGE_MIB = 512
PLATFORM = ["--only-binary=:all:", "--no-deps", "--python-version", "3.11",
            "--implementation", "cp", "--platform", "manylinux2014_x86_64"]
UUID = "6d5c5f2e-1b1e-4c1a-9d1e-5f0f5e5a1200"
HASH_SEED = "0b4b1f0a-6c55-4a8e-8d40-1e3f2a7c0001"

PAIRS = {
    "binary": {"old": ["numpy==1.26.0", "scipy==1.11.4", "pandas==2.1.4", "pillow==10.1.0"],
               "new": ["numpy==1.26.4", "scipy==1.12.0", "pandas==2.2.0", "pillow==10.2.0"]},
    "text": {"old": ["botocore==1.34.0", "django==4.2.9", "sympy==1.12"],
             "new": ["botocore==1.34.20", "django==4.2.10", "sympy==1.12.1"]},
}


def _recipe_hash(name: str) -> str:
    recipe = {"pair": PAIRS[name], "mib": IMAGE_MIB, "uuid": UUID, "seed": HASH_SEED,
              "stdlib": sysconfig.get_paths()["stdlib"], "version": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _download(requirements: list[str], wheels: Path) -> list[Path]:
    """The wheel of each pinned requirement, downloaded once."""
    found = []
    for req in requirements:
        project, version = req.split("==")
        prefix = f"{project.replace('-', '_').lower()}-{version}-"
        have = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix)]
        if not have:
            run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *PLATFORM, req])
            have = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix)]
        found.append(have[0])
    return found


def _pip_install(wheels: list[Path], target: Path) -> None:
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--no-compile", "--disable-pip-version-check", "--target", str(target),
         *map(str, wheels)])


def _installed_paths(site: Path, wheel: Path) -> list[Path]:
    """The top-level entries a wheel installed (from its RECORD): what an uninstall removes."""
    name, version = wheel.name.split("-")[:2]
    record = site / f"{name}-{version}.dist-info" / "RECORD"
    tops = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines() if line}
    return [site / top for top in sorted(tops - {".."}) if (site / top).exists()]


def build_pair(name: str, cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """(OLD, NEW) image paths of pair `name`, built if not cached."""
    pair = PAIRS[name]
    out = cache / f"{name}-{_recipe_hash(name)}"
    old, new = out / "old.img", out / "new.img"
    if old.exists() and new.exists():
        return old, new
    require_root()
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    old_wheels, new_wheels = _download(pair["old"], wheels), _download(pair["new"], wheels)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with scratch_dir("fusesnap-pair-") as work:
        img = work / "old.img"
        with open(img, "wb") as f:
            f.truncate(IMAGE_MIB << 20)
        run(["mkfs.ext4", "-q", "-F", "-U", UUID, "-E", f"hash_seed={HASH_SEED}", str(img)])
        mnt = work / "mnt"
        mnt.mkdir()
        with attached(img, direct_io=False) as device:
            run(["mount", device, str(mnt)])
            try:
                shutil.copytree(stdlib, mnt / "lib" / "python3.11", symlinks=True,
                                ignore=shutil.ignore_patterns("site-packages", "test", "__pycache__"))
                _pip_install(old_wheels, mnt / "lib" / "site-packages")
            finally:
                run(["umount", str(mnt)])
        shutil.copyfile(img, work / "new.img")
        with attached(work / "new.img", direct_io=False) as device:
            run(["mount", device, str(mnt)])
            try:
                site = mnt / "lib" / "site-packages"
                for wheel in old_wheels:   # uninstall: the package's files go
                    for path in _installed_paths(site, wheel):
                        if path.is_dir():
                            shutil.rmtree(path)
                        else:
                            path.unlink()
                run(["sync"])
                _pip_install(new_wheels, site)
            finally:
                run(["umount", str(mnt)])
        run(["e2fsck", "-fn", str(work / "new.img")])
        os.replace(work / "old.img", old)
        os.replace(work / "new.img", new)
    return old, new


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), action="append",
                    help="build this pair (default: all)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help=f"where wheels and images are kept (default {DEFAULT_CACHE})")
    args = ap.parse_args()
    for name in args.pair or sorted(PAIRS):
        old, new = build_pair(name, args.cache)
        print(f"{name}: {old} {new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
