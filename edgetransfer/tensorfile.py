"""Reading tensor files that came from someone else: checked before anything large is allocated.

Weights arrive from colleagues, vendors and model zoos. A safetensors file is validated from its
header alone before the library reads it — header size bounded by the file, JSON without duplicate
names, every tensor's dtype known and its byte range inside the file, matching its shape, and not
overlapping another — so an absurd header cannot make us allocate gigabytes and a crafted one cannot
alias two tensors. Torch pickles are only ever loaded with `weights_only=True`: a pickle that would
run code is refused (exit 4) and there is no retry with unsafe loading. Non-finite weights are
refused too: a NaN in a checkpoint poisons every prediction made with it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from .errors import IntegrityError

#: bytes per element of each safetensors dtype
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
#: the safetensors library's own bound on the JSON header
MAX_HEADER_BYTES = 100_000_000


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise IntegrityError(f"duplicate tensor names in the safetensors header: {', '.join(dupes[:5])}")
    return dict(pairs)


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The validated header of a safetensors file (tensor name → dtype/shape/data_offsets)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise IntegrityError(f"not a safetensors file: {size} bytes, shorter than its 8-byte header size",
                                     path=path)
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise IntegrityError(f"header claims {n} bytes but the file holds {size - 8} after the size field",
                                     path=path)
            raw = fh.read(n)
    except OSError as exc:
        raise IntegrityError(f"cannot read ({exc.strerror or exc})", path=path) from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except IntegrityError as exc:
        raise IntegrityError(str(exc), path=path) from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"unreadable safetensors header ({exc})", path=path) from exc
    if not isinstance(header, dict):
        raise IntegrityError("the safetensors header is not a JSON object", path=path)
    data = size - 8 - n
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise IntegrityError("__metadata__ must map names to strings", path=path)
            continue
        spans.append((*_span(name, entry, data, path), name))
    spans.sort()
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise IntegrityError(f"tensors {n1!r} and {n2!r} overlap in the data section", path=path)
    return header


def _span(name: str, entry: Any, data: int, path: Path) -> tuple[int, int]:
    if not isinstance(entry, dict):
        raise IntegrityError(f"tensor {name!r}: header entry is not an object", path=path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise IntegrityError(f"tensor {name!r}: unknown dtype {dtype!r}", path=path)
    if (not isinstance(shape, list) or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise IntegrityError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}", path=path)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise IntegrityError(f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}", path=path)
    begin, end = offsets
    if not 0 <= begin <= end <= data:
        raise IntegrityError(f"tensor {name!r}: bytes {begin}..{end} lie outside the {data}-byte data section",
                             path=path)
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise IntegrityError(f"tensor {name!r}: {end - begin} bytes cannot hold {dtype} {shape}", path=path)
    return begin, end


def check_finite(state: dict[str, Any], path: str | Path) -> None:
    """Refuse weights with NaN or infinity, naming the first tensors that hold them."""
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise IntegrityError(f"non-finite weights (NaN or inf) in {', '.join(bad[:5])}"
                             + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""), path=path)


def read_safetensors(path: str | Path, *, finite: bool = True) -> dict[str, Any]:
    """Tensors of a safetensors file, after `safetensors_header` accepted it (and, by default, all finite)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise IntegrityError(f"not a readable safetensors file ({exc})", path=path) from exc
    if finite:
        check_finite(state, path)
    return state


def load_torch_weights(path: str | Path) -> Any:
    """`torch.load` with `weights_only=True`; anything else in the pickle is refused, never retried unsafely."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- garbage makes the unpickler raise anything (struct.error, ...);
        # weights_only never executes what it reads, so every failure is the same refusal
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IntegrityError(f"refused to load: not a plain tensor file, or damaged ({reason})", path=path) from exc
