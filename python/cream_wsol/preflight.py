"""Pre-flight check of a data set's files, before any training step.

A missing or corrupt image is otherwise found when it is first sampled, possibly
hours into an epoch. :func:`check_datasets` opens every image (and mask) file of
the given :class:`~cream_wsol.data.WSOLDataset` splits and reads its header with
PIL (no decoding of the pixels: a file whose header is intact but whose data is
truncated is still found later, by the loader, which names it), with a tqdm bar and
a thread pool (the work is file I/O). Every bad file is listed at once;
:class:`BadFilesError` carries the whole list.

``cream-wsol train`` runs it unless ``--no-file-check`` is given
(``TrainConfig.check_files``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .data import CorruptFileError

__all__ = ["BadFilesError", "check_file", "check_datasets", "dataset_files"]

# how many bad files the error message lists itself (all of them go to bad_files.txt)
_LIST_IN_MESSAGE = 50


class BadFilesError(CorruptFileError):
    """Some files of the splits are missing or unreadable; ``bad`` is the list of
    ``(path, reason)``."""

    def __init__(self, message: str, bad: Sequence[Tuple[str, str]]):
        super().__init__(message)
        self.bad = list(bad)


def check_file(path: str) -> Optional[str]:
    """None if ``path`` is an image PIL can identify (header only), else the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot stat ({exc.strerror or exc})"
    if not os.path.isfile(path):
        return "not a regular file"
    if size == 0:
        return "empty file"
    try:
        with Image.open(path) as im:
            w, h = im.size
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as exc:  # truncated header, permission, ...
        return f"cannot read the header ({type(exc).__name__}: {exc})"
    if w <= 0 or h <= 0:
        return f"invalid size {w}x{h}"
    return None


def dataset_files(ds) -> List[Tuple[str, str]]:
    """``(path, what)`` of every file a split reads: its images, and its masks."""
    out = [(ds.image_path(i), f"{ds.split} image") for i in ds.image_ids]
    for image_id in ds.image_ids:
        for rel in getattr(ds, "_mask_paths", {}).get(image_id, []):
            out.append((os.path.join(ds.mask_root, rel), f"{ds.split} mask"))
        ign = getattr(ds, "_ignore_paths", {}).get(image_id, "")
        if ign:
            out.append((os.path.join(ds.mask_root, ign), f"{ds.split} ignore mask"))
    return out


def check_datasets(datasets: Iterable, *, progress: bool = True, workers: int = 8,
                   report_dir: Optional[str] = None) -> Dict[str, object]:
    """Header-check every file of ``datasets``.

    Returns ``{"checked": n, "bad": [(path, reason)], "message": str}``; the message
    is one line when all is well, else it lists the bad files (the first 50; with
    ``report_dir`` the full list is written to ``<report_dir>/bad_files.txt``) and
    names the options that point at the data (``--data-root``, ``--metadata-root``,
    ``--mask-root``) and the one that skips the check (``--no-file-check``)."""
    from tqdm.auto import tqdm

    datasets = [d for d in datasets if d is not None]
    files: List[Tuple[str, str]] = []
    seen = set()
    for ds in datasets:
        for path, what in dataset_files(ds):
            if path not in seen:
                seen.add(path)
                files.append((path, what))
    splits = ", ".join(sorted({d.split for d in datasets}))
    bad: List[Tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = pool.map(check_file, [p for p, _ in files], chunksize=64)
        for (path, what), reason in tqdm(zip(files, results), total=len(files), desc=f"checking files ({splits})",
                                         disable=not progress, leave=False, dynamic_ncols=True):
            if reason is not None:
                bad.append((path, f"{what}: {reason}"))
    n = len(files)
    if not bad:
        return {"checked": n, "bad": [], "message": f"file check: all {n} files of the splits {splits} are readable"}
    roots = sorted({d.data_root for d in datasets})
    meta = sorted({d.metadata_root for d in datasets})
    if len(bad) == n:
        head = (f"none of the {n} files of the splits {splits} can be read (e.g. {bad[0][0]}: {bad[0][1]}); "
                f"is --data-root right? data root {', '.join(roots)}, metadata root {', '.join(meta)}")
        lines = []
    else:
        head = (f"{len(bad)} of the {n} files of the splits {splits} cannot be used "
                f"(data root {', '.join(roots)}, metadata root {', '.join(meta)}):")
        lines = [f"  {p}  ({r})" for p, r in bad[:_LIST_IN_MESSAGE]]
        if len(bad) > _LIST_IN_MESSAGE:
            lines.append(f"  ... and {len(bad) - _LIST_IN_MESSAGE} more")
    tail = ("Fix or replace these files (or drop their lines from the metadata), check --data-root / "
            "--metadata-root / --mask-root, or skip this check with --no-file-check.")
    if report_dir:
        os.makedirs(report_dir, exist_ok=True)
        listing = os.path.join(report_dir, "bad_files.txt")
        with open(listing, "w") as fh:
            for p, r in bad:
                fh.write(f"{p}\t{r}\n")
        tail += f" The full list is in {listing}."
    return {"checked": n, "bad": bad, "message": "\n".join([head, *lines, tail])}
