"""LangChain's standard tool tests (langchain-tests) for each of the four tools.

The integration tests call ``invoke`` and ``ainvoke`` against the emulator, run in its
own thread so that a synchronous call cannot deadlock the test's event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests
from moondream_tools import AsyncMoondream, VisionTools
from moondream_tools.testing import FakeMoondream

from lc_support import SCENE
from langchain_moondream import (
    MoondreamBaseTool,
    MoondreamCountTool,
    MoondreamDescribeTool,
    MoondreamLocateTool,
    MoondreamSegmentTool,
)

EXAMPLES: dict[type[MoondreamBaseTool], dict[str, Any]] = {
    MoondreamDescribeTool: {"image": "img_1", "question": "How many red circles are there?"},
    MoondreamCountTool: {"image": "img_1", "object": "red circle"},
    MoondreamLocateTool: {"image": "img_1", "object": "blue square"},
    MoondreamSegmentTool: {"image": "img_1", "object": "red circle", "point": [640, 420]},
}
OFFLINE = "http://127.0.0.1:9/v1"  # never contacted by the unit tests


class _Unit(ToolsUnitTests):
    tool_class: type[MoondreamBaseTool]

    @property
    def tool_constructor(self) -> type[MoondreamBaseTool]:
        return self.tool_class

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"backend": AsyncMoondream(base_url=OFFLINE)}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return EXAMPLES[self.tool_class]

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return (
            {"MOONDREAM_API_KEY": "env-key", "MOONDREAM_BASE_URL": OFFLINE},
            {},
            {"name": self.tool_class.spec.name, "response_format": "content_and_artifact"},
        )


class _Integration(ToolsIntegrationTests):
    tool_class: type[MoondreamBaseTool]
    vision: VisionTools

    @pytest.fixture(autouse=True)
    async def _emulator(self, threaded_fake: FakeMoondream) -> AsyncIterator[None]:
        client = AsyncMoondream(api_key=threaded_fake.api_key, base_url=threaded_fake.base_url)
        self.vision = VisionTools(client)
        self.vision.add_image(SCENE.render())  # "img_1"
        yield
        await client.aclose()

    @property
    def tool_constructor(self) -> type[MoondreamBaseTool]:
        return self.tool_class

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"vision": self.vision}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return EXAMPLES[self.tool_class]


class TestDescribeUnit(_Unit):
    tool_class = MoondreamDescribeTool


class TestCountUnit(_Unit):
    tool_class = MoondreamCountTool


class TestLocateUnit(_Unit):
    tool_class = MoondreamLocateTool


class TestSegmentUnit(_Unit):
    tool_class = MoondreamSegmentTool


class TestDescribeIntegration(_Integration):
    tool_class = MoondreamDescribeTool


class TestCountIntegration(_Integration):
    tool_class = MoondreamCountTool


class TestLocateIntegration(_Integration):
    tool_class = MoondreamLocateTool


class TestSegmentIntegration(_Integration):
    tool_class = MoondreamSegmentTool
