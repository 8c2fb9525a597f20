"""Property-based fuzzing: arbitrary input gives a result or a typed error, never another exception.

Covers the SVG path decoder (``parse_path``, ``flatten_path``, ``segment_rings``), the
rasterizer and COCO RLE helpers, every server-answer parser (``parse_result`` for each
result model, the client's stream-event converters, ``_decode_json``, end to end through
the emulator over real HTTP) and the image pipeline (``prepare_image`` on arbitrary,
valid and damaged images).

Two hypothesis profiles, picked by the ``HYPOTHESIS_PROFILE`` environment variable:

- ``ci`` (default): a few dozen to ~150 examples per test, derandomized so CI is
  deterministic; the whole file runs in well under 30 s.
- ``fuzz``: thousands of examples per test (``HYPOTHESIS_FUZZ_EXAMPLES``, default 5000),
  no deadline, random seeds::

      HYPOTHESIS_PROFILE=fuzz .venv/bin/python -m pytest tests/core/test_fuzz.py -m fuzz -q

The profiles are applied per test (``parent=``), so loading this module never changes
hypothesis' global settings for other test files.

Every bug these properties found is pinned by a regression test at the end of the file.
A new one is added as ``xfail(strict=True)`` until it is fixed, with the broad property
kept clear of its input domain meanwhile, so the suite stays green and keeps finding new
bugs.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from moondream_tools import AsyncMoondream
from moondream_tools._streaming import chat_events as _chat_events, text_events as _text_events
from moondream_tools._transport import INVALID as _INVALID, decode_json as _decode_json
from moondream_tools.client import parse_chat as _parse_chat
from moondream_tools.errors import ImageError, MoondreamError, ResponseError
from moondream_tools.geometry import (
    flatten_path,
    mask_to_rle,
    parse_path,
    rasterize,
    rle_from_string,
    rle_to_mask,
    rle_to_string,
    segment_rings,
)
from moondream_tools.images import ImageSettings, PreparedImage, prepare_image
from moondream_tools.results import (
    Answer,
    Caption,
    ChatResult,
    Detections,
    ImageSize,
    ModelInfo,
    Points,
    SegmentBBoxEvent,
    Segmentation,
    parse_result,
)
from moondream_tools.testing import FakeMoondream

pytestmark = pytest.mark.fuzz

# ---------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=2000,  # ms
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "5000")),
    deadline=None,
    derandomize=False,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_OK,
)
_PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if _PROFILE_NAME not in ("ci", "fuzz"):
    _PROFILE_NAME = "ci"
PROFILE = settings.get_profile(_PROFILE_NAME)


def fuzz_settings(scale: float = 1.0, **overrides: Any) -> settings:
    """The active profile with ``max_examples`` scaled by ``scale`` (at least 1)."""
    examples = max(1, int(PROFILE.max_examples * scale))
    return settings(PROFILE, max_examples=examples, **overrides)


def outcome(call: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> Any:
    """``call()``'s result, or None when it raised one of ``allowed`` (anything else propagates)."""
    try:
        return call()
    except allowed as exc:
        if currently_in_test_context():  # note() only works inside a @given test
            note(f"raised {type(exc).__name__}: {str(exc)[:200]}")
        return None


# ---------------------------------------------------------------------------
# 1. SVG path data
# ---------------------------------------------------------------------------

PATH_ALPHABET = "MmLlHhVvCcSsQqTtZzAa0123456789.,-+eE \t\n"
path_texts = st.one_of(
    st.text(max_size=120),
    st.text(alphabet=PATH_ALPHABET, max_size=200),
    # mostly letters with short numbers: reaches the command logic more often
    st.lists(
        st.tuples(st.sampled_from("MmLlHhVvCcSsQqTtZz"), st.lists(st.integers(-99, 99), max_size=7)),
        max_size=12,
    ).map(lambda cmds: "".join(letter + ",".join(map(str, nums)) for letter, nums in cmds)),
)
_POS_RE = re.compile(r"at position (\d+)")


def _check_error_position(exc: ResponseError, text: str) -> None:
    match = _POS_RE.search(str(exc))
    assert match is not None, str(exc)
    assert 0 <= int(match.group(1)) <= len(text), (str(exc), len(text))


@fuzz_settings(1.5)
@given(d=path_texts, partial=st.booleans())
@example(d="M.1.2l.3,0Q1,1,.5,.5z", partial=False)
@example(d="M0,0L1e999,0", partial=False)
@example(d="M0 0 L 1", partial=True)
@example(d="z", partial=False)
@example(d="M0,0 A1,1 0 0 1 1,1", partial=False)
def test_path_decoders_are_total(d: str, partial: bool) -> None:
    try:
        subpaths = parse_path(d)
    except ResponseError as exc:
        _check_error_position(exc, d)
        subpaths = None
    for sub in subpaths or []:
        assert sub[0][0] == "M"
        for letter, args in sub:
            assert len(args) == {"M": 2, "L": 2, "C": 6, "Q": 4, "Z": 0}[letter]
            assert all(math.isfinite(v) for v in args)
    rings = outcome(lambda: flatten_path(d, partial=partial), (ResponseError,))
    if subpaths is not None:
        # A complete path also decodes as a (possibly cut) stream.
        assert outcome(lambda: flatten_path(d, partial=True), (ResponseError,)) is not None
    if subpaths is not None and not partial:
        assert rings is not None
    for ring in rings or []:
        assert len(ring) >= 3
    pixel_rings = outcome(
        lambda: segment_rings(d, (0.1, 0.2, 0.6, 0.9), 64, 48, partial=partial), (ResponseError,)
    )
    if pixel_rings is not None:
        mask = rasterize(pixel_rings, 64, 48)
        assert mask.size == (64, 48)


# -- well-formed paths -------------------------------------------------------

_coords = st.builds(lambda n, k: n / 10**k, st.integers(-20000, 20000), st.integers(0, 3))
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "Z": 0}


@st.composite
def path_programs(draw: st.DrawFn) -> tuple[list[tuple[str, tuple[float, ...]]], list[list[tuple[str, tuple[float, ...]]]]]:
    """(ops, expected): ops are ``(letter, absolute args)`` to encode; expected is what
    ``parse_path`` must return (H/V as L, S as C, T as Q with reflected control points)."""
    ops: list[tuple[str, tuple[float, ...]]] = []
    expected: list[list[tuple[str, tuple[float, ...]]]] = []
    for _ in range(draw(st.integers(1, 3))):
        x, y = draw(_coords), draw(_coords)
        ops.append(("M", (x, y)))
        sub: list[tuple[str, tuple[float, ...]]] = [("M", (x, y))]
        expected.append(sub)
        cx, cy = sx, sy = x, y
        last_c: tuple[float, float] | None = None
        last_q: tuple[float, float] | None = None
        for _ in range(draw(st.integers(0, 8))):
            kind = draw(st.sampled_from("LHVCSQT"))
            if kind == "L":
                x, y = draw(_coords), draw(_coords)
                ops.append(("L", (x, y)))
                sub.append(("L", (x, y)))
                cx, cy, last_c, last_q = x, y, None, None
            elif kind == "H":
                x = draw(_coords)
                ops.append(("H", (x,)))
                sub.append(("L", (x, cy)))
                cx, last_c, last_q = x, None, None
            elif kind == "V":
                y = draw(_coords)
                ops.append(("V", (y,)))
                sub.append(("L", (cx, y)))
                cy, last_c, last_q = y, None, None
            elif kind in "CS":
                x2, y2, x, y = (draw(_coords) for _ in range(4))
                if kind == "C":
                    x1, y1 = draw(_coords), draw(_coords)
                    ops.append(("C", (x1, y1, x2, y2, x, y)))
                elif last_c is None:
                    x1, y1 = cx, cy
                    ops.append(("S", (x2, y2, x, y)))
                else:
                    x1, y1 = 2 * cx - last_c[0], 2 * cy - last_c[1]
                    ops.append(("S", (x2, y2, x, y)))
                sub.append(("C", (x1, y1, x2, y2, x, y)))
                cx, cy, last_c, last_q = x, y, (x2, y2), None
            else:
                x, y = draw(_coords), draw(_coords)
                if kind == "Q":
                    x1, y1 = draw(_coords), draw(_coords)
                    ops.append(("Q", (x1, y1, x, y)))
                else:
                    x1, y1 = (cx, cy) if last_q is None else (2 * cx - last_q[0], 2 * cy - last_q[1])
                    ops.append(("T", (x, y)))
                sub.append(("Q", (x1, y1, x, y)))
                cx, cy, last_c, last_q = x, y, None, (x1, y1)
        if draw(st.booleans()):
            ops.append(("Z", ()))
            sub.append(("Z", ()))
            cx, cy = sx, sy
    return ops, expected


def _fmt_number(value: float, style: str) -> str:
    text = repr(float(value))
    if style == "compact":  # potrace: no leading zero, no trailing ".0"
        if text.endswith(".0"):
            text = text[:-2]
        if text.startswith("0."):
            text = text[1:]
        elif text.startswith("-0."):
            text = "-" + text[2:]
    elif style == "exp":
        text = f"{value:.16e}"
    elif style == "plus" and not text.startswith("-"):
        text = "+" + text
    return text


def encode_path(
    ops: list[tuple[str, tuple[float, ...]]],
    *,
    style: str,
    relative: list[bool],
    implicit: bool,
    join_dots: bool = False,
) -> str:
    """SVG text for ``ops`` (absolute), each op written absolute or relative."""
    sep_numbers = {"comma": ",", "space": " ", "commaspace": ", ", "compact": " ", "exp": " ", "plus": ",",
                   "mixed": " \t, \n"}[style]
    sep_letter = "" if style in ("compact", "comma", "plus") else " "
    sep_commands = "" if style in ("compact", "comma", "plus") else " " if style != "mixed" else "\n"
    out: list[str] = []
    cx = cy = sx = sy = 0.0
    prev_letter = ""
    for index, (letter, args) in enumerate(ops):
        rel = relative[index % len(relative)] if relative else False
        if letter == "Z":
            out.append(sep_commands + ("z" if rel else "Z"))
            cx, cy = sx, sy
            prev_letter = "Z"
            continue
        if rel:
            if letter == "H":
                nums = [args[0] - cx]
            elif letter == "V":
                nums = [args[0] - cy]
            else:
                nums = [v - (cx if i % 2 == 0 else cy) for i, v in enumerate(args)]
        else:
            nums = list(args)
        written = letter.lower() if rel else letter
        texts = [_fmt_number(v, "compact" if style == "compact" else style) for v in nums]
        body = texts[0]
        for prev, text in zip(texts, texts[1:]):
            glue = sep_numbers
            if style == "compact":
                if text[0] in "+-" or (join_dots and text[0] == "." and ("." in prev or "e" in prev)):
                    glue = ""
            body += glue + text
        omit = implicit and prev_letter and (
            (written == prev_letter and written not in "MmZz")
            or (prev_letter == "M" and written == "L")
            or (prev_letter == "m" and written == "l")
        )
        if omit:
            out.append(sep_numbers + body if not (style == "compact" and body[0] in "+-") else body)
        else:
            out.append((sep_commands if out else "") + written + sep_letter + body)
        prev_letter = written
        if letter == "M":
            sx, sy = args
        if letter == "H":
            cx = args[0]
        elif letter == "V":
            cy = args[0]
        else:
            cx, cy = args[-2], args[-1]
    return "".join(out)


_styles = st.sampled_from(["comma", "space", "commaspace", "compact", "exp", "plus", "mixed"])


def _assert_close(actual: list[list[tuple[str, tuple[float, ...]]]], expected: list[list[tuple[str, tuple[float, ...]]]]) -> None:
    assert [[c for c, _ in sub] for sub in actual] == [[c for c, _ in sub] for sub in expected]
    for sub_a, sub_e in zip(actual, expected):
        for (_, args_a), (_, args_e) in zip(sub_a, sub_e):
            assert len(args_a) == len(args_e)
            for a, e in zip(args_a, args_e):
                assert math.isclose(a, e, rel_tol=1e-9, abs_tol=1e-6), (args_a, args_e)


@fuzz_settings(1.5)
@given(
    program=path_programs(),
    style=_styles,
    relative=st.lists(st.booleans(), min_size=1, max_size=6),
    implicit=st.booleans(),
    lead=st.sampled_from(["", " ", "\n\t "]),
    trail=st.sampled_from(["", " ", "\n"]),
)
def test_well_formed_paths_round_trip(
    program: Any, style: str, relative: list[bool], implicit: bool, lead: str, trail: str
) -> None:
    ops, expected = program
    d = lead + encode_path(ops, style=style, relative=relative, implicit=implicit) + trail
    note(repr(d))
    _assert_close(parse_path(d), expected)
    rings = flatten_path(d, tolerance=5.0)
    assert len(rings) <= len(expected)
    # Every cut of the stream decodes as a partial path (coarse tolerance: speed).
    step = max(1, len(d) // 60)
    for end in list(range(0, len(d) + 1, step)) + [len(d)]:
        flatten_path(d[:end], partial=True, tolerance=1e6)


def test_encoder_examples() -> None:
    """The test's own encoder writes the styles it claims to."""
    ops = [("M", (0.5, -0.25)), ("L", (1.0, 0.0)), ("H", (2.0,)), ("Z", ())]
    assert encode_path(ops, style="compact", relative=[False], implicit=False) == "M.5-.25L1 0H2Z"
    assert encode_path(ops, style="space", relative=[False], implicit=True) == "M 0.5 -0.25 1.0 0.0 H 2.0 Z"
    assert encode_path(ops, style="comma", relative=[True], implicit=False) == "m0.5,-0.25l0.5,0.25h1.0z"
    assert parse_path("M.5-.25L1 0H2Z") == [[("M", (0.5, -0.25)), ("L", (1.0, 0.0)), ("L", (2.0, 0.0)), ("Z", ())]]


@fuzz_settings(0.5)
@given(program=path_programs(), style=_styles, relative=st.lists(st.booleans(), min_size=1, max_size=4),
       cut=st.integers(0, 10_000), bbox=st.tuples(*[st.floats(-0.5, 1.5)] * 4),
       size=st.tuples(st.integers(1, 80), st.integers(1, 80)))
def test_generated_rings_rasterize_inside_the_image(
    program: Any, style: str, relative: list[bool], cut: int, bbox: tuple[float, ...], size: tuple[int, int]
) -> None:
    ops, _ = program
    # Normalize coordinates to about [-0.2, 1.2] of the bbox, like a real mask.
    small = [(letter, tuple(v / 20000 + 0.5 for v in args)) for letter, args in ops]
    d = encode_path(small, style=style, relative=relative, implicit=True)
    d = d[: cut % (len(d) + 1)]
    width, height = size
    rings = segment_rings(d, bbox, width, height, partial=True)
    for mode in ("1", "L"):
        mask = rasterize(rings, width, height, mode=mode)
        assert mask.size == (width, height) and mask.mode == mode
        assert set(np.unique(np.asarray(mask.convert("L"))).tolist()) <= {0, 255}
    rle = mask_to_rle(mask)
    assert sum(rle["counts"]) == width * height
    assert rle_to_mask(rle).convert("L").tobytes() == mask.tobytes()


@fuzz_settings(1.0)
@given(
    size=st.tuples(st.integers(0, 24), st.integers(0, 24)),
    seed=st.integers(0, 2**32 - 1),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    mode=st.sampled_from(["1", "L"]),
)
def test_rle_round_trips(size: tuple[int, int], seed: int, density: float, mode: str) -> None:
    width, height = size
    rng = np.random.default_rng(seed)
    bits = rng.random((height, width)) < density
    values = np.where(bits, rng.integers(1, 256, (height, width)), 0).astype(np.uint8)
    mask = Image.fromarray(values, "L") if mode == "L" else Image.fromarray(bits)
    if mask.size != (width, height):  # numpy drops empty axes in some versions
        mask = Image.new(mode, (width, height))
    rle = mask_to_rle(mask)
    assert rle["size"] == [height, width]
    assert sum(rle["counts"]) == width * height
    assert all(c >= 0 for c in rle["counts"]) and all(c > 0 for c in rle["counts"][1:])
    decoded = rle_to_mask(rle)
    expected = (np.asarray(mask.convert("L")) > 0) if width and height else np.zeros((height, width), bool)
    assert decoded.size == (width, height)
    if width and height:
        assert np.array_equal(np.asarray(decoded.convert("L")) > 0, expected)
    text = rle_to_string(rle["counts"])
    assert rle_from_string(text) == rle["counts"]
    assert rle_from_string(text.encode("ascii")) == rle["counts"]
    assert rle_to_mask({"size": rle["size"], "counts": text}).tobytes() == decoded.tobytes()


@fuzz_settings(1.0)
@given(counts=st.lists(st.integers(0, 2**40), max_size=30))
def test_rle_string_round_trips_any_counts(counts: list[int]) -> None:
    # From the fourth count on, counts are stored as deltas; any non-negative list round-trips.
    assert rle_from_string(rle_to_string(counts)) == counts


@fuzz_settings(1.0)
@given(s=st.one_of(st.text(max_size=40), st.text(alphabet=[chr(c) for c in range(40, 120)], max_size=40)))
def test_rle_from_string_is_total(s: str) -> None:
    counts = outcome(lambda: rle_from_string(s), (ValueError,))
    if counts is not None:
        assert all(c >= 0 for c in counts)
        assert rle_from_string(rle_to_string(counts)) == counts


# ---------------------------------------------------------------------------
# 2. Server answers
# ---------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # nan and +-inf included
    st.text(max_size=30),
)
def _json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)


json_values = st.recursive(json_scalars, _json_containers, max_leaves=25)
unit = st.floats(-0.5, 1.5, allow_nan=False)


def _box(x0: float, y0: float, x1: float, y1: float) -> dict[str, float]:
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}


boxes = st.builds(_box, unit, unit, unit, unit)
points = st.one_of(st.builds(lambda x, y: {"x": x, "y": y}, unit, unit), st.lists(unit, min_size=2, max_size=2))
small_paths = st.one_of(
    st.text(alphabet=PATH_ALPHABET, max_size=60),
    st.builds(
        lambda prog, style, rel: encode_path(
            [(k, tuple(v / 20000 + 0.5 for v in a)) for k, a in prog[0]], style=style, relative=rel, implicit=True
        ),
        path_programs(),
        _styles,
        st.lists(st.booleans(), min_size=1, max_size=3),
    ),
)

VALID: dict[type, st.SearchStrategy[dict[str, Any]]] = {
    Caption: st.fixed_dictionaries({"caption": st.text(max_size=40)}),
    Answer: st.fixed_dictionaries(
        {"answer": st.text(max_size=40)},
        optional={
            "reasoning": st.none()
            | st.fixed_dictionaries(
                {"text": st.text(max_size=40)},
                optional={
                    "grounding": st.none()
                    | st.lists(
                        st.fixed_dictionaries(
                            {"start_idx": st.integers(-5, 50), "end_idx": st.integers(-5, 50)},
                            optional={"points": st.lists(points, max_size=3)},
                        ),
                        max_size=3,
                    )
                },
            )
        },
    ),
    Detections: st.fixed_dictionaries({"objects": st.lists(boxes, max_size=4)}),
    Points: st.fixed_dictionaries({"points": st.lists(points, max_size=4)}),
    Segmentation: st.fixed_dictionaries(
        {"path": st.none() | small_paths}, optional={"bbox": st.none() | boxes}
    ),
    SegmentBBoxEvent: st.fixed_dictionaries({"type": st.just("bbox"), "bbox": boxes}),
    ChatResult: st.fixed_dictionaries(
        {"content": st.text(max_size=30)},
        optional={
            "reasoning": st.none() | st.text(max_size=20),
            "finish_reason": st.none() | st.sampled_from(["stop", "length"]),
            "model": st.none() | st.text(max_size=10),
            "usage": st.none() | st.dictionaries(st.text(max_size=8), st.integers(0, 999), max_size=3),
        },
    ),
    ModelInfo: st.fixed_dictionaries({"id": st.text(max_size=20)}, optional={"owned_by": st.none() | st.text(max_size=10)}),
}
RESULT_CLASSES = list(VALID)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> Any:
    """A valid structure with one node (at any depth) replaced by arbitrary JSON, or a key dropped."""
    value = draw(base)

    def walk(node: Any) -> Any:
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(node, list) else []
        if not children or draw(st.integers(0, 2)) == 0:
            return draw(json_values)
        key, child = draw(st.sampled_from(children))
        copy = dict(node) if isinstance(node, dict) else list(node)
        if isinstance(copy, dict) and draw(st.integers(0, 4)) == 0:
            del copy[key]
        else:
            copy[key] = walk(child)
        return copy

    return walk(value)


def any_answer(cls: type) -> st.SearchStrategy[Any]:
    return st.one_of(json_values, VALID[cls], mutated(VALID[cls]))


def exercise(result: Any) -> None:
    """Use a parsed result the way callers do; only ResponseError may come out."""
    if isinstance(result, Segmentation):
        if result.image_size is None:
            return
        rings = outcome(result.rings, (ResponseError,))
        if rings is None:
            return
        assert result.mask().size == result.image_size.as_tuple()
        assert 0 <= result.area_px <= result.image_size.width * result.image_size.height
        rle = result.to_rle(compressed=True)
        assert rle_to_mask(rle).size == result.image_size.as_tuple()
        result.to_geojson()
        result.to_svg()
        _ = result.bbox_px
    elif isinstance(result, (Detections, Points)) and result.image_size is not None:
        for p in result.to_pixels():
            assert all(math.isfinite(v) for v in p.model_dump().values())
    elif isinstance(result, Answer) and result.image_size is not None:
        result.grounding_pixels()
    if hasattr(result, "model_dump_json"):
        json.loads(result.model_dump_json())


@pytest.mark.parametrize("cls", RESULT_CLASSES, ids=lambda c: c.__name__)
@fuzz_settings(0.6)
@given(data=st.data())
def test_parse_result_gives_a_result_or_response_error(cls: type, data: st.DataObject) -> None:
    answer = data.draw(any_answer(cls), label="answer")
    size = data.draw(st.none() | st.builds(ImageSize, width=st.integers(1, 64), height=st.integers(1, 64)))
    context = {"image_size": size, "object": "car"} if cls is not ChatResult and cls is not ModelInfo else {}
    result = outcome(lambda: parse_result(cls, answer, what="/fuzz", request_id="req_1", **context), (ResponseError,))
    if result is None:
        return
    assert isinstance(result, cls)
    exercise(result)


@fuzz_settings(1.0)
@given(
    answer=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"choices": st.lists(st.fixed_dictionaries({"message": st.fixed_dictionaries({"content": json_values})}), max_size=2)},
            optional={"id": json_values, "model": json_values, "usage": json_values},
        ),
        mutated(st.fixed_dictionaries({
            "id": st.text(max_size=8),
            "choices": st.just([{"message": {"content": "hi", "reasoning": "r"}, "finish_reason": "stop"}]),
            "model": st.just("moondream3"),
            "usage": st.just({"prompt_tokens": 1}),
        })),
    ),
)
def test_parse_chat_gives_a_result_or_response_error(answer: Any) -> None:
    if not isinstance(answer, dict):
        return  # the client checks for a JSON object before _parse_chat
    result = outcome(lambda: _parse_chat(answer, None), (ResponseError,))
    assert result is None or isinstance(result, ChatResult)


def _stream_stub() -> Any:
    return types.SimpleNamespace(request_id=None)


event_dicts = st.one_of(
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    st.dictionaries(st.sampled_from(["chunk", "text", "completed", "__done__", "id", "choices", "type"]),
                    json_values, max_size=4),
    mutated(st.just({"id": "c1", "choices": [{"delta": {"content": "hi"}}]})),
)


@fuzz_settings(1.0)
@given(event=event_dicts)
def test_stream_event_converters_are_total(event: dict[str, Any]) -> None:
    if not isinstance(event, dict):
        return  # the SSE reader only passes JSON objects on
    for convert in (_text_events, _chat_events):
        stream = _stream_stub()
        result = outcome(lambda: convert(stream, event), (ResponseError,))
        if result is not None:
            items, done = result
            assert isinstance(done, bool)
            assert all(isinstance(item, str) and item for item in items)
            assert stream.request_id is None or isinstance(stream.request_id, str)


@fuzz_settings(1.5)
@given(raw=st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(alphabet='[]{}",:0123456789.-+eE tfnrulasNIiy\\', max_size=60).map(str.encode),
))
def test_decode_json_never_raises(raw: bytes) -> None:
    # Bounded nesting: deeply nested input is pinned by test_decode_json_deep_nesting.
    _decode_json(raw)


# -- end to end through the emulator ----------------------------------------


class _Server:
    """The emulator and a client on one event loop in a background thread, shared by
    every example of a test (an HTTP round trip per example, one server for all)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-emulator", daemon=True)
        self.thread.start()
        self.fake: FakeMoondream = self.run(self._start_fake())
        self.client = AsyncMoondream(api_key=self.fake.api_key, base_url=self.fake.base_url, max_retries=0,
                                     timeout=10.0)
        image = Image.new("RGB", (32, 24), (40, 90, 200))
        self.image: PreparedImage = self.run(prepare_image(image, settings=ImageSettings()))

    @staticmethod
    async def _start_fake() -> FakeMoondream:
        fake = FakeMoondream()
        await fake.start()
        return fake

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        try:
            self.run(self.client.aclose())
            self.run(self.fake.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    try:
        yield srv
    finally:
        srv.close()


ROUTES: dict[str, tuple[type, Callable[[AsyncMoondream, PreparedImage], Any]]] = {
    "detect": (Detections, lambda md, img: md.detect(img, "car")),
    "point": (Points, lambda md, img: md.point(img, "car")),
    "segment": (Segmentation, lambda md, img: md.segment(img, "car")),
    "caption": (Caption, lambda md, img: md.caption(img)),
    "query": (Answer, lambda md, img: md.query(img, "what?", reasoning=True)),
    "chat": (ChatResult, lambda md, img: md.chat([{"role": "user", "content": "hi"}])),
    "models": (ModelInfo, lambda md, img: md.models()),
}


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


@pytest.mark.parametrize("route", list(ROUTES))
@fuzz_settings(0.25, deadline=None)
@given(data=st.data())
def test_http_answers_give_a_result_or_moondream_error(server: _Server, route: str, data: st.DataObject) -> None:
    cls, call = ROUTES[route]
    base = VALID[cls]
    if route == "chat":
        base = st.builds(lambda m: {"choices": [{"message": m}]}, VALID[ChatResult])
    elif route == "models":
        base = st.builds(lambda items: {"data": items}, st.lists(VALID[ModelInfo] | st.text(max_size=5), max_size=3))
    body = data.draw(st.one_of(
        json_values.map(_dumps),
        base.map(_dumps),
        mutated(base).map(_dumps),
        st.text(max_size=40),
    ), label="body")
    server.fake.fail_next(1, status=200, body=body)

    async def go() -> Any:
        try:
            return await call(server.client, server.image)
        except MoondreamError as exc:
            return exc

    result = server.run(go())
    if isinstance(result, MoondreamError):
        note(f"{type(result).__name__}: {result}")
        result = None
    assert server.fake.pending_faults == 0
    if result is not None:
        results = result if isinstance(result, list) else [result]
        for item in results:
            assert isinstance(item, cls)
            exercise(item)


def _sse(events: list[Any]) -> str:
    return "".join(f"data: {e if isinstance(e, str) else _dumps(e)}\n\n" for e in events)


segment_events = st.one_of(
    st.builds(lambda b: {"type": "bbox", "bbox": b}, boxes),
    st.builds(lambda c: {"type": "path_delta", "chunk": c}, st.one_of(small_paths, st.text(max_size=10), json_values)),
    st.builds(lambda p, b: {"type": "final", "path": p, "bbox": b}, small_paths, boxes),
    mutated(st.builds(lambda b: {"type": "bbox", "bbox": b}, boxes)),
    mutated(st.builds(lambda p, b: {"type": "final", "path": p, "bbox": b}, small_paths, boxes)),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    st.sampled_from(["[DONE]", "not json", "[1, 2]", '{"error": "boom"}']),
)


@fuzz_settings(0.25, deadline=None)
@given(events=st.lists(segment_events, max_size=6))
def test_http_segment_stream_gives_events_or_moondream_error(server: _Server, events: list[Any]) -> None:
    server.fake.fail_next(1, status=200, body=_sse(events), content_type="text/event-stream")

    async def go() -> list[Any]:
        got: list[Any] = []
        try:
            async with server.client.stream_segment(server.image, "car") as stream:
                async for event in stream:
                    got.append(event)
        except MoondreamError as exc:
            got.append(exc)
        return got

    got = server.run(go())
    for event in got:
        if isinstance(event, MoondreamError):
            note(f"{type(event).__name__}: {event}")
        elif event.type in ("path_delta", "final"):
            exercise(event.segmentation)


@fuzz_settings(0.25, deadline=None)
@given(events=st.lists(st.one_of(event_dicts, st.sampled_from(["[DONE]", "oops"])), max_size=5),
       route=st.sampled_from(["caption", "query", "chat"]))
def test_http_text_streams_give_text_or_moondream_error(server: _Server, events: list[Any], route: str) -> None:
    server.fake.fail_next(1, status=200, body=_sse(events), content_type="text/event-stream")
    md = server.client

    async def go() -> list[Any]:
        pieces: list[Any] = []
        opened = {
            "caption": lambda: md.stream_caption(server.image),
            "query": lambda: md.stream_query(server.image, "what?"),
            "chat": lambda: md.stream_chat([{"role": "user", "content": "hi"}]),
        }[route]
        try:
            async with opened() as stream:
                async for piece in stream:
                    pieces.append(piece)
        except MoondreamError as exc:
            pieces.append(exc)
        return pieces

    pieces = server.run(go())
    if pieces and isinstance(pieces[-1], MoondreamError):
        note(f"{type(pieces[-1]).__name__}: {pieces.pop()}")
    assert all(isinstance(p, str) and p for p in pieces)


# ---------------------------------------------------------------------------
# 3. Images
# ---------------------------------------------------------------------------

IMAGE_SETTINGS = ImageSettings(max_pixels=4_000_000)
_MODE_BYTES = {"L": 1, "LA": 2, "P": 1, "RGB": 3, "RGBA": 4, "CMYK": 4, "I;16": 2}
_FORMATS = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["1", "L", "P", "RGB"],
    "BMP": ["1", "L", "P", "RGB", "RGBA"],
    "WEBP": ["RGB", "RGBA", "L"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"],
}
_EXIF_FORMATS = {"PNG", "JPEG", "WEBP", "TIFF"}


def _make_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    nbytes = ((width + 7) // 8) * height if mode == "1" else width * height * _MODE_BYTES[mode]
    return Image.frombytes(mode, size, rng.bytes(nbytes))


def _encode(img: Image.Image, fmt: str, orientation: int | None) -> bytes | None:
    buffer = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if orientation is not None and fmt in _EXIF_FORMATS:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    try:
        img.save(buffer, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError):
        return None
    return buffer.getvalue()


def _supported() -> list[tuple[str, str]]:
    combos = []
    for fmt, modes in _FORMATS.items():
        for mode in modes:
            if _encode(_make_image(mode, (3, 2), 0), fmt, None) is not None:
                combos.append((fmt, mode))
    return combos


FORMAT_MODES = _supported()


@st.composite
def encoded_images(draw: st.DrawFn) -> tuple[bytes, tuple[int, int], str, str]:
    """(encoded bytes, oriented size, format, mode)."""
    fmt, mode = draw(st.sampled_from(FORMAT_MODES))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    orientation = draw(st.none() | st.integers(1, 8))
    data = _encode(_make_image(mode, size, draw(st.integers(0, 2**32 - 1))), fmt, orientation)
    assert data is not None
    oriented = (size[1], size[0]) if fmt in _EXIF_FORMATS and orientation in (5, 6, 7, 8) else size
    return data, oriented, fmt, mode


@st.composite
def damaged(draw: st.DrawFn, images: st.SearchStrategy[tuple[bytes, Any, str, str]]) -> bytes:
    data = bytearray(draw(images)[0])
    how = draw(st.sampled_from(["truncate", "flip", "header", "all"]))
    if how in ("flip", "all"):
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
    if how in ("header", "all"):
        start = draw(st.integers(0, min(32, len(data) - 1)))
        patch = draw(st.binary(min_size=1, max_size=8))
        data[start : start + len(patch)] = patch
    if how in ("truncate", "all"):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _prepare(data: bytes) -> PreparedImage | None:
    """prepare_image on its own loop: a PreparedImage, or None for an ImageError.

    Pillow warnings (corrupt EXIF, ...) are recorded, not raised: in production they are
    warnings, and this file tests what the code raises.
    """
    async def go() -> PreparedImage:
        return await prepare_image(data, settings=IMAGE_SETTINGS)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = outcome(lambda: asyncio.run(go()), (ImageError,))
    for w in caught:
        note(f"warning: {w.category.__name__}: {w.message}")
    if prepared is not None:
        assert prepared.width > 0 and prepared.height > 0
        assert prepared.data_url.startswith("data:image/jpeg;base64,")
        assert prepared.segment_data_url.startswith("data:image/jpeg;base64,")
    return prepared


@fuzz_settings(1.0)
@given(data=st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"BM", b"RIFF", b"II*\x00", b"MM\x00*"])
    .flatmap(lambda magic: st.binary(max_size=200).map(lambda rest: magic + rest)),
))
def test_prepare_arbitrary_bytes(data: bytes) -> None:
    _prepare(data)


@fuzz_settings(0.6)
@given(image=encoded_images())
def test_prepare_valid_images_keeps_their_size(image: tuple[bytes, tuple[int, int], str, str]) -> None:
    data, oriented, fmt, mode = image
    prepared = _prepare(data)
    assert prepared is not None, (fmt, mode)
    assert (prepared.width, prepared.height) == oriented


@fuzz_settings(1.0)
@given(data=damaged(encoded_images()))
def test_prepare_damaged_images(data: bytes) -> None:
    _prepare(data)


# ---------------------------------------------------------------------------
# Regressions found by this file (each was a bug, now fixed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("d", ["M0,0Q1e308,0,-1e308,0", "M0,0C1e308,1e308,-1e308,-1e308,1,1z"])
def test_huge_path_numbers_in_curves(d: str) -> None:
    outcome(lambda: flatten_path(d), (ResponseError,))


def test_huge_path_numbers_in_segmentation_mask() -> None:
    seg = parse_result(
        Segmentation, {"path": "M0,0L1e307,0L1,1z", "bbox": _box(0, 0, 1, 1)},
        what="/segment", image_size=ImageSize(width=64, height=48),
    )
    outcome(seg.mask, (ResponseError,))


def test_huge_bbox_is_rejected_or_drawn() -> None:
    size = ImageSize(width=64, height=48)
    for bbox in (_box(-1e308, 0, 1e308, 1), _box(0, 0, 1e308, 1e308)):
        seg = parse_result(Segmentation, {"path": "M0,0L1,0L1,1z", "bbox": bbox}, what="/segment", image_size=size)
        rings = outcome(seg.rings, (ResponseError,))
        if rings is not None:
            assert all(math.isfinite(v) for ring in rings for point in ring for v in point), rings
            seg.mask()


def test_partial_compact_dot_numbers() -> None:
    assert flatten_path("M.5.5", partial=True) == []
    assert flatten_path("M0,0L1,0L.5.5L0,1", partial=True) == [[(0.0, 0.0), (1.0, 0.0), (0.5, 0.5)]]
    assert parse_path("M0,0L1,1.5L.5.5") and flatten_path("M0,0L1,1.5.5", partial=True) == []
    # The final ".5" may still grow, so it is dropped; "L1,1.5" is complete and kept.
    assert segment_rings("M0,0L1,0L1,1.5.5", (0, 0, 1, 1), 10, 10, partial=True) == [
        [(0.0, 0.0), (10.0, 0.0), (10.0, 15.0)]
    ]


def test_decode_json_deep_nesting() -> None:
    assert _decode_json(b"[" * 100_000) is _INVALID


def test_http_deeply_nested_answer(server: _Server) -> None:
    server.fake.fail_next(1, status=200, body="[" * 100_000)

    async def go() -> None:
        try:
            await server.client.detect(server.image, "car")
        except MoondreamError:
            pass

    server.run(go())


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: data.index(b"IDAT") + 4]


def _webp_with_corrupt_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="WEBP", exif=exif)
    data = buffer.getvalue()
    at = data.index(b"MM\x00*")  # the TIFF header of the EXIF chunk
    return data[:at] + b"LM\x00*" + data[at + 4 :]


@pytest.mark.parametrize("make", [_truncated_png, _webp_with_corrupt_exif], ids=["png", "webp"])
def test_truncated_png_exif_read(make: Callable[[], bytes]) -> None:
    with pytest.raises(ImageError):
        asyncio.run(prepare_image(make(), settings=IMAGE_SETTINGS))


def test_tiff_orientation_is_applied_once() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2)).save(buffer, format="TIFF", exif=exif)
    prepared = _prepare(buffer.getvalue())
    assert prepared is not None
    assert (prepared.width, prepared.height) == (2, 3)
    assert (prepared.upload_width, prepared.upload_height) == (2, 3)


def _tiff_with_bad_second_ifd() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="TIFF")
    data = buffer.getvalue()
    assert data[-4:] == bytes(4)  # the "no next IFD" offset of the only IFD
    # Point it at a second IFD holding only an Orientation tag (no width/height).
    second = (1).to_bytes(2, "little") + bytes.fromhex("1201 0300 01000000 01000000") + bytes(4)
    return data[:-4] + len(data).to_bytes(4, "little") + second


def test_corrupt_tiff_second_ifd() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageError):
            asyncio.run(prepare_image(_tiff_with_bad_second_ifd(), settings=IMAGE_SETTINGS))


def test_http_deeply_nested_stream_event(server: _Server) -> None:
    server.fake.fail_next(1, status=200, body="data: " + "[" * 100_000 + "\n\n", content_type="text/event-stream")

    async def go() -> None:
        try:
            async for _ in server.client.stream_caption(server.image):
                pass
        except MoondreamError:
            pass

    server.run(go())
