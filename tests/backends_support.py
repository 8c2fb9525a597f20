"""Helpers for tests that run on every backend (imported by test modules; not a test file)."""

from __future__ import annotations

from typing import Any


def sent_spatial_refs(request: Any, size: tuple[int, int]) -> list[list[float]]:
    """The normalized hints a segment request carried: Moondream's ``spatial_refs``, fal's
    ``spatial_references``, or SAM 3's pixel ``point_prompts`` / ``box_prompts`` (of an image
    sent at ``size``) normalized back."""
    body = request.json
    if "spatial_refs" in body:
        return body["spatial_refs"]
    if "spatial_references" in body:
        return [[ref["x"], ref["y"]] if isinstance(ref, dict) else ref for ref in body["spatial_references"]]
    w, h = size
    points = [[p["x"] / w, p["y"] / h] for p in body.get("point_prompts", [])]
    boxes = [[b["x_min"] / w, b["y_min"] / h, b["x_max"] / w, b["y_max"] / h] for b in body.get("box_prompts", [])]
    return points + boxes
