"""SVG path data parsing: text -> subpaths of absolute commands.

:func:`parse_path` reads SVG 1.1 path data without arcs (M/L/H/V/C/S/Q/T/Z, absolute and
relative) and names the position of the first error. ``_parse(d, partial=True)``
decodes a path that a stream may have cut anywhere, ignoring its unfinished tail.
"""

from __future__ import annotations

import math
import re

from ..errors import ResponseError


# ---------------------------------------------------------------------------
# SVG path data
# ---------------------------------------------------------------------------
#
# Grammar (SVG 1.1 path data, without arcs): a path is whitespace, then commands.
# A command is a letter followed by numbers; numbers are separated by whitespace, at
# most one comma, or nothing at all when the next number starts with a sign or a dot
# ("M.1.2" is 0.1 0.2, "M1-2" is 1 -2, "1..2" is "1." then ".2"). Number forms:
# "1", "-1", "+1", "1.", ".5", "-.5", "1.5", "1e-3", "1E+2", ".5e2". Tokens are read
# greedily (longest number first), as the SVG grammar says.

Command = tuple[str, tuple[float, ...]]
"""One absolute command: ("M", (x, y)), ("L", (x, y)), ("C", (x1, y1, x2, y2, x, y)),
("Q", (x1, y1, x, y)) or ("Z", ())."""


_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUM_RE = re.compile(_NUM)
# A command letter: any ASCII letter but e/E, which belong to numbers.
_CMD_RE = re.compile(r"([A-DF-Za-df-z])([^A-DF-Za-df-z]*)")
# The arguments of one command when they are well formed (atomic groups: linear time).
_ARGS = rf"[ \t\r\n\f]*(?:(?>{_NUM})(?:(?>[ \t\r\n\f]*,?[ \t\r\n\f]*)(?>{_NUM}))*)?[ \t\r\n\f]*"
_ARGS_RE = re.compile(_ARGS)
# A whole well-formed path after its leading blanks: checked in one call, then split.
_PATH_RE = re.compile(rf"(?:[A-DF-Za-df-z](?>{_ARGS}))*")
_SPLIT_RE = re.compile(r"([A-DF-Za-df-z])")
_WSP = " \t\r\n\f"
# What a cut stream may end with: the prefix of a number (possibly empty).
_LAST_ARGS_RE = re.compile(r"[A-DF-Za-df-z]([^A-DF-Za-df-z]*)\Z")
_EXPONENT_START_RE = re.compile(r"[eE][+-]?")
_NUMBER_START_RE = re.compile(r"[+-]?\.?")
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "Z": 0}
_ARITY.update({k.lower(): v for k, v in _ARITY.items()})


def _fail(pos: int, message: str) -> ResponseError:
    return ResponseError(f"malformed SVG path at position {pos}: {message}")


def _describe(d: str, pos: int) -> str:
    return "end of path" if pos >= len(d) else repr(d[pos])


def _diagnose_args(d: str, cmd: str, start: int, end: int) -> ResponseError:
    """Find where the arguments ``d[start:end]`` of command ``cmd`` go wrong."""
    pos = start
    need_number = False  # True right after a comma
    seen_number = False
    while pos < end:
        ch = d[pos]
        if ch in _WSP:
            pos += 1
            continue
        if ch == ",":
            if not seen_number:
                return _fail(pos, f"expected a number after {cmd!r}, got ','")
            if need_number:
                return _fail(pos, "expected a number after ',', got ','")
            need_number = True
            pos += 1
            continue
        match = _NUM_RE.match(d, pos)
        if match is None or match.end() > end:
            after = "','" if need_number else repr(cmd)
            return _fail(pos, f"expected a number after {after}, got {_describe(d, pos)}")
        pos = match.end()
        need_number = False
        seen_number = True
    # Only reachable for a trailing comma.
    return _fail(end, f"expected a number after ',', got {_describe(d, end)}")


def _check_letter(letter: str, pos: int) -> None:
    if letter in "Aa":
        raise _fail(pos, "arcs ('A'/'a') are not supported")
    raise _fail(pos, f"unknown command {letter!r}")


def _check_finite(d: str, start: int, end: int) -> None:
    for m in _NUM_RE.finditer(d, start, end):
        if not math.isfinite(float(m.group())):
            raise _fail(m.start(), f"number {m.group()[:24]!r} is out of range")


def _commands(d: str, partial: bool) -> list[tuple[str, list[float], int, int]]:
    """Split ``d`` into (letter, numbers, letter position, end of arguments)."""
    out: list[tuple[str, list[float], int, int]] = []
    stripped = d.lstrip(_WSP)
    first = len(d) - len(stripped)
    if not stripped:
        return out
    d_eff = d
    if partial:
        # A stream may be cut anywhere: drop a trailing number (with nothing after it,
        # it may still grow: "0.1" of "0.125"), then trailing blanks and a dangling comma.
        d_eff = _drop_growing_tail(d).rstrip(_WSP)
        if d_eff.endswith(","):
            d_eff = d_eff[:-1]
    if _PATH_RE.fullmatch(d_eff, first) is not None:
        # Fast path: the grammar holds, so split at the letters and read the numbers.
        parts = _SPLIT_RE.split(d_eff)
        pos = len(parts[0])
        findall = _NUM_RE.findall
        for k in range(1, len(parts), 2):
            letter = parts[k]
            args = parts[k + 1]
            at = pos
            pos += 1 + len(args)
            if letter not in _ARITY:
                _check_letter(letter, at)
            nums = list(map(float, findall(args)))
            total = sum(nums)
            if total - total != 0.0:  # inf or nan somewhere (or a huge sum): look closer
                _check_finite(d_eff, at + 1, pos)
            out.append((letter, nums, at, pos))
        return out
    # Slow path: find and name the first error.
    pos = first
    length = len(d_eff)
    for match in _CMD_RE.finditer(d_eff, first):
        if match.start() != pos:  # only possible for the first command
            break
        letter = match.group(1)
        if letter not in _ARITY:
            _check_letter(letter, match.start())
        a_start, a_end = match.span(2)
        if _ARGS_RE.fullmatch(d_eff, a_start, a_end) is None:
            raise _diagnose_args(d, letter, a_start, a_end)
        nums = [float(v) for v in _NUM_RE.findall(d_eff, a_start, a_end)]
        _check_finite(d_eff, a_start, a_end)
        out.append((letter, nums, match.start(), a_end))
        pos = a_end
    if pos != length:
        if pos == first:
            raise _fail(first, f"expected a command letter, got {_describe(d, first)}")
        raise _fail(pos, f"expected a command letter, got {_describe(d, pos)}")
    return out


def _drop_growing_tail(d: str) -> str:
    """``d`` without a number at its very end that more streamed characters could extend.

    The last command's arguments are tokenized left to right, as the grammar reads them
    (so ``M.5.5`` ends with the token ``.5``, not ``5.5``); a token running to the end, an
    exponent just begun (``1e-``) or a number just begun (``-``, ``.``) is dropped.
    """
    match = _LAST_ARGS_RE.search(d)
    if match is None:
        return d
    last = None
    for last in _NUM_RE.finditer(d, match.start(1)):
        pass
    rest_start = last.end() if last is not None else match.start(1)
    rest = d[rest_start:]
    if last is not None and (rest == "" or _EXPONENT_START_RE.fullmatch(rest)):
        return d[: last.start()]
    started = rest.lstrip(_WSP + ",")
    if _NUMBER_START_RE.fullmatch(started):
        return d[: len(d) - len(started)]
    return d


def _parse(d: str, partial: bool) -> list[list[Command]]:
    commands = _commands(d, partial)
    subpaths: list[list[Command]] = []
    current: list[Command] | None = None
    cx = cy = 0.0  # current point
    sx = sy = 0.0  # start of the current subpath
    # Control point to reflect for S (after C/S) and T (after Q/T), else None.
    last_c: tuple[float, float] | None = None
    last_q: tuple[float, float] | None = None
    closed = False
    n_commands = len(commands)
    for index, (letter, nums, at, end) in enumerate(commands):
        upper = letter.upper()
        arity = _ARITY[letter]
        count = len(nums)
        if arity == 0:
            if count:
                args = d[at + 1 : end]
                raise _fail(end - len(args.lstrip(_WSP)), f"{letter!r} takes no numbers")
        else:
            if count % arity or not count:
                if partial and index == n_commands - 1:
                    # The tail of a cut stream: keep the complete groups only.
                    del nums[count - count % arity :]
                    count = len(nums)
                    if not count:
                        break
                else:
                    got = _describe(d, end)
                    raise _fail(end, f"expected a number after {letter!r}, got {got}")
        rel = letter != upper
        if current is None and upper == "Z" and closed:
            continue  # a repeated Z changes nothing
        if current is None and upper != "M":
            if not subpaths or not closed:
                raise _fail(at, f"a path must start with 'M' or 'm', got {letter!r}")
            # A drawing command right after Z starts a new subpath at the old start.
            current = [("M", (sx, sy))]
            subpaths.append(current)
        if upper == "M":
            for i in range(0, count, 2):
                x, y = nums[i], nums[i + 1]
                if rel:
                    x += cx
                    y += cy
                if i == 0:
                    current = [("M", (x, y))]
                    subpaths.append(current)
                    sx, sy = x, y
                else:
                    assert current is not None
                    current.append(("L", (x, y)))
                cx, cy = x, y
            last_c = last_q = None
        elif upper == "Z":
            assert current is not None
            current.append(("Z", ()))
            cx, cy = sx, sy
            current = None
            closed = True
            last_c = last_q = None
            continue
        else:
            assert current is not None
            append = current.append
            if upper == "L":
                for i in range(0, count, 2):
                    x, y = nums[i], nums[i + 1]
                    if rel:
                        x += cx
                        y += cy
                    append(("L", (x, y)))
                    cx, cy = x, y
                last_c = last_q = None
            elif upper == "H":
                for x in nums:
                    if rel:
                        x += cx
                    append(("L", (x, cy)))
                    cx = x
                last_c = last_q = None
            elif upper == "V":
                for y in nums:
                    if rel:
                        y += cy
                    append(("L", (cx, y)))
                    cy = y
                last_c = last_q = None
            elif upper == "C" or upper == "S":
                step = 6 if upper == "C" else 4
                for i in range(0, count, step):
                    if step == 6:
                        x1, y1, x2, y2, x, y = nums[i : i + 6]
                        if rel:
                            x1 += cx
                            y1 += cy
                    else:
                        x2, y2, x, y = nums[i : i + 4]
                        if last_c is None:
                            x1, y1 = cx, cy
                        else:
                            x1, y1 = 2 * cx - last_c[0], 2 * cy - last_c[1]
                    if rel:
                        x2 += cx
                        y2 += cy
                        x += cx
                        y += cy
                    append(("C", (x1, y1, x2, y2, x, y)))
                    last_c = (x2, y2)
                    cx, cy = x, y
                last_q = None
            else:  # Q or T
                step = 4 if upper == "Q" else 2
                for i in range(0, count, step):
                    if step == 4:
                        x1, y1, x, y = nums[i : i + 4]
                        if rel:
                            x1 += cx
                            y1 += cy
                    else:
                        x, y = nums[i : i + 2]
                        if last_q is None:
                            x1, y1 = cx, cy
                        else:
                            x1, y1 = 2 * cx - last_q[0], 2 * cy - last_q[1]
                    if rel:
                        x += cx
                        y += cy
                    append(("Q", (x1, y1, x, y)))
                    last_q = (x1, y1)
                    cx, cy = x, y
                last_c = None
        closed = False
    return subpaths


def parse_path(d: str) -> list[list[Command]]:
    """Parse SVG path data into subpaths of absolute commands in the path's own units.

    Supports M/L/H/V/C/S/Q/T/Z, absolute and relative, with implicit repeats (numbers
    after M are L). H and V become L, S becomes C and T becomes Q with the reflected
    control point. Numbers may be written ``1``, ``-1``, ``+1``, ``1.``, ``.5``, ``-.5``,
    ``1e-3``, ``1E+2``, separated by whitespace, one comma, or nothing when the next
    number starts with a sign or a dot (``"M.1.2"`` is 0.1, 0.2; ``"M1-2"`` is 1, -2;
    ``"1..2"`` is 1.0, 0.2), as in the SVG grammar. Arcs, out-of-range numbers and
    anything malformed raise :class:`~moondream_tools.errors.ResponseError` naming the
    position, e.g. ``malformed SVG path at position 10: expected a number after 'C',
    got end of path``.

    >>> parse_path("M.1.2l.3,0Q1,1,.5,.5z")
    [[('M', (0.1, 0.2)), ('L', (0.4, 0.2)), ('Q', (1.0, 1.0, 0.5, 0.5)), ('Z', ())]]
    >>> parse_path("   ")
    []
    """
    return _parse(d, False)
