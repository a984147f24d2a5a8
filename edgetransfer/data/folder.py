"""ImageFolder scanning with strict checks, train/val/test splits and a content hash of the data.

Accepted layouts (anything else is a `DataError`, exit code 2, that names the path):

* ``DATA/train/<class>/*`` with optional ``DATA/val/<class>/*`` and ``DATA/test/<class>/*``;
* ``DATA/<class>/*`` (class folders straight under the root, no ``train/``): everything is train, and
  val and test are split off it.

A split that is not on disk is split off train, stratified per class with a fixed seed, and the split is
written into ``DatasetSplits.record`` (file lists included) so that a checkpoint can say exactly which
images it never trained on. Classes are matched by folder NAME in every split, never by position: the
class order is fixed once (sorted train folders, or the list a checkpoint brings) and a test folder with
fewer classes keeps its labels. Bad data is found here, before any training starts: every image is
decoded once (`verify_images`) and all bad files are reported together, not one per run.

Only numpy and Pillow are used, so the torch-free device runtime can validate data with it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError
from ..fsutil import sha256_file
from ..preprocess import IMAGE_EXTENSIONS, load_image

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")
_LAYOUT = ("expected DATA/train/<class>/<images> (optionally DATA/val/<class>/... and "
           "DATA/test/<class>/...), or DATA/<class>/<images>")


@dataclass(frozen=True)
class Sample:
    """One image and its label: the index of its class NAME in the fixed class order."""

    path: Path
    label: int


@dataclass
class DatasetSplits:
    """The scanned dataset: fixed class order, the three splits, and how they were made."""

    root: Path
    classes: list[str]  # sorted class names from train/ (or as given) -- the order fixed at training time
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    record: dict  # JSON-able: sources, seed, fractions, counts, file lists of generated splits

    def split(self, name: str) -> list[Sample]:
        """The samples of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise UsageError(f"unknown split {name!r}; expected one of {list(SPLITS)}", field="split")
        return getattr(self, name)

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> number of images, every class listed (0 included) so gaps are visible."""
        out = {name: dict.fromkeys(self.classes, 0) for name in SPLITS}
        for name in SPLITS:
            for s in self.split(name):
                out[name][self.classes[s.label]] += 1
        return out


def _ignored(name: str) -> bool:
    # Hidden entries (.DS_Store, ._x.jpg AppleDouble files, .ipynb_checkpoints) and macOS zip debris.
    return name.startswith(".") or name == "__MACOSX"


def _parallel(fn: Callable, items: list) -> list:
    # Decoding and hashing release the GIL; results keep the input order, so output is deterministic.
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def _rel(path: Path, root: Path) -> str:
    """Relative POSIX path, NFC-normalised: the same string on Linux, macOS (NFD names) and Windows."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        rel = Path(os.path.relpath(path, root))
    return unicodedata.normalize("NFC", rel.as_posix())


def _require_dir(folder: Path, what: str) -> None:
    if not folder.exists():
        raise DataError(f"{what} does not exist; {_LAYOUT}", path=folder)
    if not folder.is_dir():
        raise DataError(f"{what} is not a folder; {_LAYOUT}", path=folder)


def _class_dirs(folder: Path) -> dict[str, Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list folder: {exc}", path=folder) from exc
    out: dict[str, Path] = {}
    seen: dict[str, str] = {}  # casefolded NFC name -> the folder name that claimed it
    for e in entries:
        if _ignored(e.name) or not e.is_dir():
            continue
        # one class, one name: "café" typed on macOS (NFD) and on Linux (NFC) is the same class, and
        # "Bolt" next to "bolt" is a typo that would split one class in two (or merge on another disk)
        name = unicodedata.normalize("NFC", e.name)
        key = name.casefold()
        if key in seen:
            raise DataError(f"class folders {seen[key]!r} and {e.name!r} name the same class (they differ only "
                            "in case or Unicode normalisation); merge or rename one", path=folder)
        seen[key] = e.name
        out[name] = Path(e.path)
    return out


def _list_images(class_dir: Path) -> list[Path]:
    """Images anywhere under `class_dir`, sorted by relative path. Symlinked sub-folders are not
    followed (os.walk followlinks=False), so a link back up the tree cannot loop."""

    def fail(exc: OSError) -> None:
        raise DataError(f"cannot list folder: {exc.strerror or exc}", path=exc.filename or class_dir) from exc

    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=fail, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        found += [Path(dirpath, f) for f in filenames
                  if not _ignored(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: _rel(p, class_dir))


def _scan_level(folder: Path, classes: list[str], split: str) -> list[Sample]:
    dirs = _class_dirs(folder)
    if not dirs:
        raise DataError(f"no class folders in the {split} split; {_LAYOUT}", path=folder)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(dirs) - set(index))
    if unknown:
        hints = [f"{u!r} ~ {c!r}" for u in unknown for c in classes if u.casefold() == c.casefold()]
        hint = f" (names are case-sensitive: {', '.join(hints)})" if hints else ""
        raise DataError(f"the {split} split has class folders that train does not have: {unknown}; "
                        f"known classes: {classes}{hint}", path=folder)
    samples: list[Sample] = []
    for name in sorted(dirs, key=index.__getitem__):
        files = _list_images(dirs[name])
        if not files:
            raise DataError(f"class folder '{name}' in the {split} split has no images "
                            f"(looked for {sorted(IMAGE_EXTENSIONS)}, case-insensitive)", path=dirs[name])
        samples += [Sample(p, index[name]) for p in files]
    return samples


def _check_classes(classes: Sequence[str]) -> list[str]:
    out = list(classes)
    if not out or not all(isinstance(c, str) and c for c in out):
        raise UsageError("classes must be a non-empty list of non-empty names", field="classes")
    dupes = sorted({c for c in out if out.count(c) > 1})
    if dupes:
        raise UsageError(f"duplicate class names {dupes}", field="classes")
    return out


def scan_split(folder: str | Path, classes: Sequence[str]) -> list[Sample]:
    """Scan one ImageFolder level (``folder/<class>/*``), labelling by class NAME in `classes` order.

    For evaluating a model on a folder of its own (e.g. ``validate --data DIR``): a class folder that
    `classes` does not know is a DataError naming it; classes absent from the folder are fine (a test set
    may cover fewer classes). Does not decode images; call `verify_images` for that.
    """
    folder = Path(folder).expanduser().absolute()
    _require_dir(folder, "image folder")
    return _scan_level(folder, _check_classes(classes), folder.name)


def _split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    # Round half up (not Python's banker's rounding), at least 1 per split, at least 1 left in train.
    k = {s: max(1, math.floor(n * f + 0.5)) for s, f in fractions.items()}
    while sum(k.values()) > n - 1:
        biggest = max(k, key=lambda s: (k[s], s == "val"))  # trim the largest; val first on ties
        k[biggest] -= 1
    return k


def _stratified_split(train: list[Sample], classes: list[str], fractions: dict[str, float], seed: int,
                      train_dir: Path, *, absent_ok: Sequence[str] = ()) -> dict[str, list[Sample]]:
    """Per class: permute the sorted paths with a Generator seeded by (seed, crc32(class name)), so
    adding or removing one class does not reshuffle the others; then take val, test, and the rest."""
    active = [s for s in ("val", "test") if fractions.get(s, 0.0) > 0]
    out: dict[str, list[Sample]] = {s: [] for s in ("train", *fractions)}
    by_label: dict[int, list[Sample]] = {}
    for x in train:  # already sorted by path within each class
        by_label.setdefault(x.label, []).append(x)
    for label, name in enumerate(classes):
        items = by_label.get(label, [])
        if not active or (not items and name in absent_ok):
            out["train"] += items
            continue
        if len(items) < 1 + len(active):
            raise DataError(
                f"class '{name}' has {len(items)} image(s), too few to split off {'/'.join(active)} "
                f"(needs at least {1 + len(active)}: one per split); add images, provide the "
                f"{'/'.join(active)} folder(s), or set the fraction to 0", path=train_dir / name)
        k = _split_counts(len(items), {s: fractions[s] for s in active})
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        order = rng.permutation(len(items)).tolist()
        start = 0
        for s in active:
            out[s] += [items[i] for i in sorted(order[start:start + k[s]])]
            start += k[s]
        out["train"] += [items[i] for i in sorted(order[start:])]
    return out


def scan_dataset(root: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                 classes: Sequence[str] | None = None, verify: bool = True, skip_bad: float = 0.0,
                 exclude: Sequence[str] = (), held_out_classes: bool = False) -> DatasetSplits:
    """Scan an ImageFolder tree into train/val/test, checking everything that can be wrong up front.

    `classes` (e.g. from a checkpoint) fixes the class order, and train's class folders must then match
    it exactly. A missing val or test folder is split off train (fractions are of train's images); a
    root with class folders directly and no ``train/`` has both split off. ``verify=True`` decodes
    every image once, so a truncated file fails now and not in epoch 7; with `skip_bad` up to that
    fraction of bad files is skipped instead (listed in `record["skipped"]`). `exclude` drops files
    (paths relative to the root) after splitting, so the other images keep their splits — how a run's
    skipped files stay skipped when its dataset is scanned again.

    `held_out_classes`: val/ and test/ may hold classes that train/ does not (an anomaly task trains on
    good parts only; its defect types appear only in the held-out splits). They follow train's classes
    in the class list, sorted; with `classes` given, train/ may then lack some of them.
    """
    for fname, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise UsageError(f"must be in [0, 1), got {f!r}", field=fname)
    if not 0.0 <= skip_bad < 1.0:
        raise UsageError(f"must be in [0, 1), got {skip_bad!r}", field="skip_bad_images")
    if val_fraction + test_fraction >= 1.0:
        raise UsageError("val_fraction + test_fraction must be below 1 so train keeps images", field="val_fraction")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}", field="seed")
    seed = int(seed)

    root = Path(root).expanduser().absolute()
    _require_dir(root, "dataset folder")
    train_dir = root / "train"
    if train_dir.exists():
        _require_dir(train_dir, "train")
        layout = "split_folders"
    else:
        stray = [s for s in ("val", "test") if (root / s).exists()]
        if stray:
            raise DataError(f"has {stray} but no train/ folder; {_LAYOUT}", path=root)
        layout, train_dir = "class_folders", root

    found = _class_dirs(train_dir)
    if not found:
        raise DataError(f"no class folders found; {_LAYOUT}", path=train_dir)
    if classes is None:
        class_list = sorted(found)
        if held_out_classes and train_dir != root:
            held = {c for s in ("val", "test") if (root / s).is_dir() for c in _class_dirs(root / s)}
            class_list += sorted(held - set(found))
    else:
        class_list = _check_classes(classes)
        missing = [c for c in class_list if c not in found and not held_out_classes]
        extra = sorted(set(found) - set(class_list))
        if missing or extra:
            raise DataError(f"train class folders do not match the given class list: missing {missing}, "
                            f"extra {extra}", path=train_dir)

    train = _scan_level(train_dir, class_list, "train")
    on_disk: dict[str, list[Sample]] = {}
    if layout == "split_folders":
        for s in ("val", "test"):
            if (root / s).exists():
                _require_dir(root / s, s)
                on_disk[s] = _scan_level(root / s, class_list, s)
    fractions = {"val": float(val_fraction), "test": float(test_fraction)}
    generated = [s for s in ("val", "test") if s not in on_disk]
    parts = _stratified_split(train, class_list, {s: fractions[s] for s in generated}, seed, train_dir,
                              absent_ok=[c for c in class_list if c not in found] if held_out_classes else ())
    parts.update(on_disk)

    splits = DatasetSplits(root=root, classes=class_list, train=parts["train"], val=parts["val"],
                           test=parts["test"], record={})
    splits.record = {
        "root": str(root),
        "layout": layout,
        "sources": {"train": "disk", **{s: "disk" if s in on_disk else "generated" for s in ("val", "test")}},
        "seed": seed,
        "fractions": fractions,
        "split_rule": "per class: numpy default_rng([seed, crc32(class)]).permutation(sorted paths); "
                      "count = round-half-up(n * fraction), >= 1 per generated split, >= 1 left in train",
        "counts": splits.counts(),
        "generated": {s: [_rel(x.path, root) for x in parts[s]] for s in generated},
    }
    skipped = {(root / rel).absolute() for rel in exclude}
    if verify:
        bad = verify_images(splits.train + splits.val + splits.test, max_bad_fraction=skip_bad)
        skipped |= {p for p, _ in bad}
        splits.record["skipped"] = [{"path": _rel(p, root), "reason": r} for p, r in bad]
        for p, r in bad:
            log.warning("skipping %s: %s", p, r)
    if skipped:
        for name in SPLITS:
            setattr(splits, name, [x for x in splits.split(name) if x.path.absolute() not in skipped])
        splits.record["counts"] = splits.counts()
    return splits


def _problem(path: Path) -> str | None:
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        load_image(path)
    except DataError as exc:
        return str(exc.__cause__ or exc)
    except Exception as exc:  # noqa: BLE001 -- a malformed file may trip any decoder error; report it, go on
        return f"{type(exc).__name__}: {exc}"
    return None


def verify_images(samples: Iterable[Sample], *, max_bad_fraction: float = 0.0) -> list[tuple[Path, str]]:
    """Decode every file fully; raise ONE DataError listing every bad file with its reason.

    One run then shows the whole clean-up job (truncated copies, zero-byte files, wrong extensions)
    instead of failing on the first bad file, or worse, in the middle of training. Up to
    `max_bad_fraction` of the files may be bad instead: they are returned for the caller to skip.
    """
    unique = list(dict.fromkeys(s.path for s in samples))
    reasons = _parallel(_problem, unique)
    bad = [(p, r) for p, r in zip(unique, reasons) if r is not None]
    if not bad or len(bad) <= max_bad_fraction * len(unique):
        return bad
    where = bad[0][0] if len(bad) == 1 else Path(os.path.commonpath([str(p) for p, _ in bad]))
    listing = "\n".join(f"  {p}: {r}" for p, r in bad)
    allowed = (f" (more than the {max_bad_fraction:.0%} --skip-bad-images allows)" if max_bad_fraction
               else "; or pass --skip-bad-images to train without them")
    raise DataError(f"{len(bad)} unreadable image file(s) of {len(unique)}{allowed}; fix or remove them:\n{listing}",
                    path=where)


def require_trainable(splits: DatasetSplits, batch_size: int) -> int:
    """Refuse what cannot train (one class, no training images); return the batch size to use.

    A training set smaller than the batch would leave one partial batch per epoch; a final batch of
    one image breaks BatchNorm in training mode. So the batch shrinks to the training set (logged),
    and the caller drops a last batch of one.
    """
    if len(splits.classes) < 2:
        raise DataError(f"only one class ({', '.join(splits.classes)}): a classifier needs at least two; {_LAYOUT}",
                        path=splits.root)
    n = len(splits.train)
    if n < 2:
        raise DataError(f"{n} training image(s): too few to train; {_LAYOUT}", path=splits.root)
    if batch_size > n:
        log.warning("batch size %d is larger than the %d training images; using %d", batch_size, n, n)
        return n
    return batch_size


def _file_digest(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise DataError(f"cannot read file for the dataset hash: {exc.strerror or exc}", path=path) from exc


def dataset_hash(splits: DatasetSplits) -> str:
    """sha256 over the class list and the sorted (split, relative path, label, sha256 of content) rows.

    Paths are relative to the root and POSIX/NFC-normalised, so the same data in another folder or on
    another machine hashes the same, while any changed byte, renamed file, moved split or relabel does not.
    """
    rows = sorted((s, _rel(x.path, splits.root), x.label, x.path) for s in SPLITS for x in splits.split(s))
    digests = _parallel(_file_digest, [r[3] for r in rows])
    h = hashlib.sha256()
    h.update(json.dumps({"classes": list(splits.classes)}, ensure_ascii=False).encode("utf-8") + b"\n")
    for (s, rel, label, _), digest in zip(rows, digests):
        h.update(json.dumps([s, rel, label, digest], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()
