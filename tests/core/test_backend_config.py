"""BackendConfig: picklable options, the backend built where it runs, the key from its environment."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from moondream_tools import AsyncMoondream, BackendConfig, ConfigurationError, FalMoondream
from moondream_tools.testing import FakeMoondream, Scene


async def test_builds_each_backend_with_its_key_from_the_environment(
    fake: FakeMoondream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_MD_KEY", fake.api_key)
    config = BackendConfig(base_url=fake.base_url, api_key_env="MY_MD_KEY", model="moondream3", max_concurrency=3)
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config and fake.api_key not in pickle.dumps(config).decode("latin-1")
    async with copy.build() as md:
        assert isinstance(md, AsyncMoondream) and md.model == "moondream3"
        points = await md.point(Scene.demo().render(), "red circle")
    assert len(points.points) == Scene.demo().count("red circle")
    assert fake.requests[-1].json["model"] == "moondream3"
    monkeypatch.setenv("FAL_KEY", fake.fal_key)
    async with BackendConfig(backend="fal", base_url=fake.fal_base_url).build() as fal:
        assert isinstance(fal, FalMoondream)
        assert len((await fal.point(Scene.demo().render(), "red circle")).points) == Scene.demo().count("red circle")


def test_refuses_bad_options_and_a_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigurationError, match="NOT_SET_ANYWHERE"):
        BackendConfig(api_key_env="NOT_SET_ANYWHERE").build()
    with pytest.raises(ValidationError):
        BackendConfig(backend="openai")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        BackendConfig(api_key="sk-123")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="environment variable"):
        BackendConfig(api_key_env="sk-live key")
    monkeypatch.setenv("FAL_KEY", "x")
    with pytest.raises(ConfigurationError, match="model= is for Moondream"):
        BackendConfig(backend="fal", model="m").build()
