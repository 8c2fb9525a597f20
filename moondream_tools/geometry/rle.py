"""COCO run-length encoding of masks, compatible with pycocotools.

Uncompressed counts (:func:`mask_to_rle`, :func:`rle_to_mask`) and COCO's compressed
string form (:func:`rle_to_string`, :func:`rle_from_string`). numpy is used when
importable and never required: results are identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image


def _numpy() -> Any:
    """numpy when importable, else None (the core never requires it)."""
    try:
        import numpy
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return numpy


_RUNS_RE = re.compile(rb"\x00+|\xff+")
#: A lookup table: 0 stays 0, anything else becomes 255.
_NONZERO = [0] + [255] * 255


def _mask_bytes(mask: Image.Image) -> Image.Image:
    if mask.mode == "1":
        return mask.convert("L")  # exact: "1" pixels are 0 or 255
    if mask.mode == "L":
        return mask.point(_NONZERO)
    raise ValueError(f"mask mode must be '1' or 'L', got {mask.mode!r}")


def mask_to_rle(mask: Image.Image) -> dict[str, Any]:
    """COCO uncompressed RLE of a full-size mask (mode "1" or "L", nonzero = inside).

    Returns ``{"size": [height, width], "counts": [...]}``: run lengths in column-major
    (Fortran) order, starting with a run of outside pixels (0 when the first pixel is
    inside), exactly as pycocotools. Uses numpy when importable.

    >>> from PIL import Image
    >>> mask = Image.new("1", (3, 2)); mask.putpixel((1, 0), 1)
    >>> mask_to_rle(mask)
    {'size': [2, 3], 'counts': [2, 1, 3]}
    """
    width, height = mask.size
    if mask.mode not in ("1", "L"):
        raise ValueError(f"mask mode must be '1' or 'L', got {mask.mode!r}")
    np = _numpy()
    if np is not None:
        flat = np.asarray(mask).T.ravel() != 0  # column-major; "1" reads as bool, "L" as bytes
        if flat.size == 0:
            return {"size": [height, width], "counts": [0]}
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate(([0], change, [flat.size]))
        counts = np.diff(edges).tolist()
        if flat[0]:
            counts.insert(0, 0)
        return {"size": [height, width], "counts": counts}
    raw = _mask_bytes(mask).transpose(Image.Transpose.TRANSPOSE).tobytes()
    if not raw:
        return {"size": [height, width], "counts": [0]}
    counts = [m.end() - m.start() for m in _RUNS_RE.finditer(raw)]
    if raw[0]:
        counts.insert(0, 0)
    return {"size": [height, width], "counts": counts}


def rle_to_string(counts: Sequence[int]) -> str:
    """Compress RLE counts into COCO's string form, as pycocotools' ``rleToString``.

    Each count (minus the count two places earlier, from the fourth on) is written in
    5-bit groups, low first, as characters ``48 + group`` with bit 0x20 meaning "more".

    >>> rle_to_string([2, 1, 3])
    '213'
    >>> rle_from_string(rle_to_string([0, 400, 7, 380]))
    [0, 400, 7, 380]
    """
    out: list[str] = []
    add = out.append
    for i, count in enumerate(counts):
        x = int(count)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            add(chr(c + 48))
    return "".join(out)


def rle_from_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed counts string (str or bytes) into run lengths.

    >>> rle_from_string("213")
    [2, 1, 3]
    """
    if isinstance(s, (bytes, bytearray)):
        s = s.decode("ascii")
    counts: list[int] = []
    x = k = 0
    for pos, ch in enumerate(s):
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"invalid RLE string at position {pos}: {ch!r}")
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError(f"invalid RLE string at position {pos}: negative run length")
        counts.append(x)
        x = k = 0
    if k:
        raise ValueError(f"invalid RLE string: truncated at position {len(s)}")
    return counts


def rle_to_mask(rle: Mapping[str, Any]) -> Image.Image:
    """Decode a COCO RLE (counts as a list or a compressed string) into a mode "1" mask.

    >>> rle_to_mask({"size": [2, 3], "counts": [2, 1, 3]}).getbbox()
    (1, 0, 2, 1)
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes, bytearray)):
        counts = rle_from_string(counts)
    total = 0
    parts: list[bytes] = []
    value = 0
    for count in counts:
        count = int(count)
        if count < 0:
            raise ValueError("RLE counts must not be negative")
        parts.append((b"\xff" if value else b"\x00") * count)
        total += count
        value ^= 1
    if total != width * height:
        raise ValueError(f"RLE counts sum to {total}, expected {height} x {width} = {width * height}")
    if not total:
        return Image.new("1", (width, height))
    # Column-major data of an h x w mask is row-major data of its w x h transpose.
    transposed = Image.frombytes("1", (height, width), b"".join(parts), "raw", "1;8")
    return transposed.transpose(Image.Transpose.TRANSPOSE)
