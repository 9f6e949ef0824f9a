"""Builds pyfuse3 from its sdist with `pyfuse3_patches/` applied and installs it into
the Python environment running this module:

    python3 -m fusesnap.pyfuse3_build

`bin/setup` runs it for the checkout's `.venv`; `fusesnap mount` and `fusesnap
--version` name it when the installed pyfuse3 has no fallocate handler (a stock
pyfuse3, as `pip install` brings). Standard library only, so it runs while pyfuse3 is
missing or stock. Needs network access (or a pip index), a C compiler, pkg-config,
libfuse3-dev and patch(1). The patches are described in DEVELOPERS.md.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

PYFUSE3_VERSION = "3.5.0"
PATCH_DIR = Path(__file__).with_name("pyfuse3_patches")


def patches() -> list[Path]:
    """The patches, in the order they apply."""
    return sorted(PATCH_DIR.glob(f"pyfuse3-{PYFUSE3_VERSION}-*.patch"))


def build_and_install() -> None:
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory(prefix="pyfuse3-build.") as build:
        subprocess.run([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", build,
                        f"pyfuse3=={PYFUSE3_VERSION}"], check=True)
        subprocess.run(["tar", "-xzf", f"{build}/pyfuse3-{PYFUSE3_VERSION}.tar.gz", "-C", build],
                       check=True)
        source = f"{build}/pyfuse3-{PYFUSE3_VERSION}"
        for patch in patches():
            subprocess.run(["patch", "-s", "-d", source, "-p1", "-i", str(patch)], check=True)
        # --no-deps: pyfuse3's own dependency (trio) comes with fusesnap.
        subprocess.run([*pip, "install", "--force-reinstall", "--no-deps", source], check=True)


def main() -> int:
    print(f"building pyfuse3 {PYFUSE3_VERSION} with {len(patches())} patches from {PATCH_DIR}",
          file=sys.stderr)
    try:
        build_and_install()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"pyfuse3_build: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
