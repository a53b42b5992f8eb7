"""Sample DICOM chest radiographs for the demo, without committing large files.

The samples come from ``pydicom-data`` (MIT): the RG1 computed radiograph in
several encodings. Some of them share a SOPInstanceUID (the same instance,
encoded differently), so the demo also shows duplicate handling.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from pathlib import Path

RG1_NAMES = (
    "RG1_UNCR.dcm",  # uncompressed
    "RG1_UNCI.dcm",  # uncompressed, from a lossy original
    "RG1_J2KR.dcm",  # JPEG 2000 lossless
    "RG1_J2KI.dcm",  # JPEG 2000 lossy
)


def sample_files(names: Iterable[str] = RG1_NAMES) -> list[Path]:
    """The RG1 sample files installed locally by ``pydicom-data`` (never downloads)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return []
    found = []
    for name in names:
        path = None
        with contextlib.suppress(Exception):  # a missing file is simply not a sample
            path = get_testdata_file(name, download=False)
        if path:
            found.append(Path(path))
    return found


def gather_samples(dest: Path, extra_dirs: Iterable[Path] = (), names: Iterable[str] = RG1_NAMES) -> list[Path]:
    """Copy the samples (and ``*.dcm`` of ``extra_dirs``) into ``dest`` the way a sender should:
    write ``name.part``, then rename. Returns the copied paths."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sources = sample_files(names)
    for folder in extra_dirs:
        sources.extend(sorted(Path(folder).glob("*.dcm")))
    copied = []
    for src in sources:
        target = dest / src.name
        part = target.with_name(target.name + ".part")
        shutil.copyfile(src, part)
        part.rename(target)
        copied.append(target)
    return copied


def main(argv: list[str] | None = None) -> int:
    """``python -m lungseg.edge_runtime.samples DEST [EXTRA_DIR...]``: copy the samples into DEST."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m lungseg.edge_runtime.samples DEST [EXTRA_DIR ...]\n"
              "Copy sample chest radiograph DICOMs (pydicom-data's RG1 files, and *.dcm of each "
              "EXTRA_DIR) into DEST, the way a sender should (write .part, then rename).")
        return 0 if args else 2
    copied = gather_samples(Path(args[0]), extra_dirs=[Path(a) for a in args[1:]])
    if not copied:
        print("no sample DICOMs found: pip install pydicom-data", file=sys.stderr)
        return 1
    for path in copied:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
