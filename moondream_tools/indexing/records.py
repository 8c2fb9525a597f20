""":class:`ImageRecord`: what indexing learns about one image, as text to embed and flat metadata."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FoundObjects", "ImageRecord", "MetadataValue", "phrase_key"]

#: What a vector store accepts as a metadata value (Chroma, for one, rejects anything else).
MetadataValue = str | int | float | bool | None


def phrase_key(phrase: str) -> str:
    """The metadata-key form of an object phrase: lower case, words joined by ``_``.

    >>> phrase_key("Red Circle"), phrase_key("  no-entry sign! ")
    ('red_circle', 'no_entry_sign')
    """
    return re.sub(r"[^0-9a-z]+", "_", phrase.lower()).strip("_") or "object"


class FoundObjects(BaseModel):
    """The objects found for one phrase.

    Attributes:
        phrase: the phrase as configured.
        count: how many were found (a lower bound when ``capped``).
        boxes: ``[x_min, y_min, x_max, y_max]`` of each, normalized to 0..1 of the upright image.
        pixel_boxes: the same boxes in pixels of the upright image.
        capped: the backend's object limit was reached, so there may be more.
        tiles: requests the detection took (1 unless the image was tiled).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    phrase: str
    count: int
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list)
    pixel_boxes: list[tuple[int, int, int, int]] = Field(default_factory=list)
    capped: bool = False
    tiles: int = 1


class ImageRecord(BaseModel):
    """What indexing learned about one image.

    Attributes:
        id: the sha256 of the image's bytes (hex): a renamed or copied file keeps its id.
        source: the path or URL as given (for bytes, ``"bytes:<first 12 hex of the id>"``).
        width, height: the upright size in pixels (EXIF orientation applied).
        caption: the caption, if asked for and it succeeded.
        answers: each configured question and its answer.
        ocr: the text transcribed from the image, if asked for.
        objects: per configured phrase, what was found.
        backend, model: what produced the record.
        errors: per failed part (``"image"``, ``"caption"``, ``"ocr"``, ``"question: <q>"``,
            ``"detect: <phrase>"``), the error message. Empty when everything succeeded.

    Example:
        >>> record = ImageRecord(id="ab" * 32, source="shelf.jpg", width=640, height=480,
        ...     caption="Three red circles on a shelf.",
        ...     objects={"red circle": FoundObjects(phrase="red circle", count=3)})
        >>> print(record.text())
        Three red circles on a shelf.
        Objects found: red circle: 3.
        >>> record.metadata()["count_red_circle"]
        3
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    width: int | None = None
    height: int | None = None
    caption: str | None = None
    answers: dict[str, str] = Field(default_factory=dict)
    ocr: str | None = None
    objects: dict[str, FoundObjects] = Field(default_factory=dict)
    backend: str | None = None
    model: str | None = None
    errors: dict[str, str] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every part succeeded."""
        return not self.errors

    def text(self) -> str:
        """What a retriever should embed: the caption, each question and answer, the text in
        the image, and the objects found (phrase and count; phrases with none found are left
        out, so their words do not match every image; ``metadata()`` has their zero)."""
        lines = []
        if self.caption:
            lines.append(self.caption.strip())
        for question, answer in self.answers.items():
            lines.append(f"{question.strip()} {answer.strip()}")
        if self.ocr and self.ocr.strip():
            lines.append(f"Text in the image: {self.ocr.strip()}")
        found = [o for o in self.objects.values() if o.count]
        if found:  # phrases with nothing found stay out: their words would match every image
            listed = "; ".join(f"{o.phrase}: {'at least ' if o.capped else ''}{o.count}" for o in found)
            lines.append(f"Objects found: {listed}.")
        return "\n".join(lines)

    def metadata(self) -> dict[str, MetadataValue]:
        """Flat metadata for a vector store: str / int / float / bool / None values only.

        Keys: ``image_id``, ``source``, ``width``, ``height``, ``backend``, ``model``,
        ``caption``, ``ocr``, ``answers`` (a JSON object as a string), per phrase
        ``count_<phrase>`` (an int) and ``boxes_<phrase>`` (pixel boxes as a JSON string), and
        ``errors`` (a JSON object as a string, or None when everything succeeded).
        """
        meta: dict[str, MetadataValue] = {
            "image_id": self.id,
            "source": self.source,
            "width": self.width,
            "height": self.height,
            "backend": self.backend,
            "model": self.model,
            "caption": self.caption,
            "ocr": self.ocr,
            "answers": json.dumps(self.answers, ensure_ascii=False) if self.answers else None,
        }
        for found in self.objects.values():
            key = phrase_key(found.phrase)
            meta[f"count_{key}"] = found.count
            meta[f"boxes_{key}"] = json.dumps([list(b) for b in found.pixel_boxes])
        meta["errors"] = json.dumps(self.errors, ensure_ascii=False) if self.errors else None
        return meta

    @classmethod
    def bulky_metadata_keys(cls, metadata: dict[str, Any]) -> list[str]:
        """Keys of ``metadata`` too long or too noisy to embed or show an LLM (boxes, answers,
        errors, the text already in the document)."""
        return [
            k for k in metadata
            if k.startswith("boxes_") or k in ("answers", "errors", "caption", "ocr", "image_id", "backend", "model")
        ]
