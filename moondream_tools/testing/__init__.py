"""Offline testing kit: the Moondream API emulator and synthetic scenes.

``FakeMoondream`` is a real aiohttp server on loopback that speaks the
Moondream wire format (with its Batch API, see ``batch``; and fal.ai's and
AIgateway's, see ``providers``) and answers from what a toy vision engine sees
in the received image; ``Scene``
draws flat coloured shapes and black dot-matrix ``Text`` and knows the ground
truth (the emulator reads the text back from the pixels, see ``text``). Together
they let you test an agent end to end without a key or a network. Needs numpy
(``pip install "moondream-tools[testing]"``).

This package is self-contained: it imports nothing else from moondream_tools.
"""

from .engine import COLORS, KINDS, PALETTE, Found, analyze, matches, parse_phrase
from .scene import Scene, Shape, ShapeTruth, Text, TextTruth
from .text import read_text
from .server import FakeMoondream, RecordedRequest
from .providers import FormFile
from .batch import BatchRecord, BatchUpload
from .video import MovingShape, VideoScene

__all__ = [
    "BatchRecord",
    "BatchUpload",
    "COLORS",
    "KINDS",
    "PALETTE",
    "FakeMoondream",
    "FormFile",
    "Found",
    "MovingShape",
    "RecordedRequest",
    "Scene",
    "Shape",
    "ShapeTruth",
    "Text",
    "TextTruth",
    "VideoScene",
    "analyze",
    "matches",
    "parse_phrase",
    "read_text",
]
