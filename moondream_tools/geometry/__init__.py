"""Coordinate arithmetic: the one place that turns normalized coordinates into pixels.

Moondream reports every coordinate normalized to [0, 1] of the image it saw, origin
top-left. This project reports pixels in the *oriented* frame of the user's image
(EXIF orientation applied), whatever size was actually uploaded. This package is the
only place doing normalized <-> pixel arithmetic: nothing else in the project
multiplies a normalized coordinate by a width.

Example::

    >>> from moondream_tools.geometry import box_to_pixels, point_to_pixels
    >>> box_to_pixels((0.75, 0.5, 0.25, 0.1), 640, 480)   # unordered corners get ordered
    (160.0, 48.0, 480.0, 240.0)
    >>> point_to_pixels((1.2, -0.1), 640, 480)            # clamped to the image
    (640.0, 0.0)

It also decodes Moondream's segment masks: SVG path data (normalized to the mask's
bbox) -> absolute commands (:func:`parse_path`) -> rings in pixels with curves
flattened to a tolerance (:func:`flatten_path`, :func:`segment_rings`) -> a full-size
even-odd mask (:func:`rasterize`) -> COCO RLE (:func:`mask_to_rle`,
:func:`rle_to_string`); and groups rings into polygons with holes (:func:`nest_rings`).
numpy is used when importable (RLE) and never required: results are identical.

    >>> rings = segment_rings("M0,0L1,0L1,1L0,1z", (0.0, 0.0, 0.5, 0.5), 20, 10)
    >>> rings
    [[(0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0)]]
    >>> rasterize(rings, 20, 10).histogram()[255]
    50

Modules (everything public is re-exported here; import from ``moondream_tools.geometry``):

- :mod:`.coords`: normalized <-> pixel boxes and points, :func:`clamp_unit`,
  :func:`position_word`, :func:`reading_order`, :func:`points_reading_order`;
- :mod:`.paths`: SVG path data parsing (:data:`Command`, :func:`parse_path`, and the
  partial parsing of streamed paths);
- :mod:`.flatten`: paths -> rings with curves flattened (:func:`flatten_path`,
  :func:`segment_rings`);
- :mod:`.raster`: rings -> even-odd mask (:func:`rasterize`);
- :mod:`.rings`: :data:`Ring`, :func:`ring_area`, containment and :func:`nest_rings`;
- :mod:`.rle`: COCO RLE (:func:`mask_to_rle`, :func:`rle_to_string`,
  :func:`rle_from_string`, :func:`rle_to_mask`);
- :mod:`.masks`: mask images -> binary masks and exact outline rings
  (:func:`binary_mask`, :func:`mask_union`, :func:`mask_area`, :func:`mask_bbox`,
  :func:`mask_to_rings`, :func:`scale_rings`, :func:`rings_to_path`);
- :mod:`.merge`: tile coordinates -> image pixels and the merging of boxes and points
  found in overlapping tiles (:func:`tile_box_to_pixels`, :func:`tile_point_to_pixels`,
  :func:`intersection_over_smaller`, :func:`union_box`, :func:`merge_boxes`,
  :func:`merge_points`).
"""

from __future__ import annotations

from .coords import (
    box_to_pixels,
    clamp_unit,
    pixels_to_box,
    pixels_to_point,
    point_to_pixels,
    points_reading_order,
    position_word,
    reading_order,
)
from .flatten import flatten_path, segment_rings
from .masks import (
    binary_mask,
    mask_area,
    mask_bbox,
    mask_to_rings,
    mask_union,
    rings_to_path,
    scale_rings,
)
from .merge import (
    intersection_over_smaller,
    merge_boxes,
    merge_points,
    tile_box_to_pixels,
    tile_point_to_pixels,
    union_box,
)
from .paths import Command, parse_path
from .raster import rasterize
from .rings import Ring, nest_rings, ring_area
from .rle import mask_to_rle, rle_from_string, rle_to_mask, rle_to_string

__all__ = [
    "reading_order",
    "points_reading_order",
    "clamp_unit",
    "box_to_pixels",
    "point_to_pixels",
    "pixels_to_box",
    "pixels_to_point",
    "position_word",
    "Command",
    "Ring",
    "parse_path",
    "flatten_path",
    "segment_rings",
    "rasterize",
    "ring_area",
    "nest_rings",
    "mask_to_rle",
    "rle_to_string",
    "rle_from_string",
    "rle_to_mask",
    "binary_mask",
    "mask_union",
    "mask_area",
    "mask_bbox",
    "mask_to_rings",
    "scale_rings",
    "rings_to_path",
    "tile_box_to_pixels",
    "tile_point_to_pixels",
    "intersection_over_smaller",
    "union_box",
    "merge_boxes",
    "merge_points",
]
