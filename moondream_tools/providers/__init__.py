"""Hosted backends besides Moondream's own API, each a :class:`~moondream_tools.VisionBackend`.

- :mod:`.fal`: :class:`FalMoondream` (Moondream 3 Preview on fal.ai, all five skills, sync or
  queue) and :class:`FalSam3` (SAM 3 on fal.ai, segmentation only).
- :mod:`.aigateway`: :class:`AIGatewaySegmenter` (segmentation through AIgateway's image
  edits; experimental).

All of them share one transport (retries, limits, typed errors, key redaction) through
:class:`~moondream_tools._http_backend.HttpBackend`, and return the same result types as
:class:`~moondream_tools.AsyncMoondream`.

Example::

    from moondream_tools import FalMoondream, FalSam3, VisionTools

    tools = VisionTools(FalMoondream(), segment_backend=FalSam3())     # FAL_KEY
"""

from .aigateway import AIGatewaySegmenter
from .fal import FalMoondream, FalSam3

__all__ = ["AIGatewaySegmenter", "FalMoondream", "FalSam3"]
