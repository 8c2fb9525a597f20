""":class:`BackendConfig`: a backend described by picklable options, built where it runs.

The command line, the MCP server and jobs spread over processes (SimpleDirectoryReader
workers, Ray actors) need to say which backend to use without holding one: a client holds
sessions and locks, and its key must not travel. A ``BackendConfig`` holds only the choice and
its options; :meth:`BackendConfig.build` makes the backend in the process that uses it,
reading the key from that process's environment.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._http_backend import HttpBackend
from ._transport import Pacer
from .errors import ConfigurationError

__all__ = ["BACKEND_CHOICES", "BackendConfig"]

#: The backends a :class:`BackendConfig` can build.
BACKEND_CHOICES = ("moondream", "fal")


class BackendConfig(BaseModel):
    """Which backend to build, and how (never the key itself).

    Args:
        backend: ``"moondream"`` (Moondream Cloud, or any server speaking its API at
            ``base_url``, e.g. Moondream Station) or ``"fal"`` (Moondream 3 on fal.ai).
        base_url: the server (default: the backend's own, or ``MOONDREAM_BASE_URL``).
        model: the model to ask (Moondream only; e.g. a finetune).
        api_key_env: the environment variable holding the key (default: the backend's,
            ``MOONDREAM_API_KEY`` / ``FAL_KEY``), read by :meth:`build` in the process that
            builds it.
        max_concurrency: requests in flight at once.
        requests_per_second: a pace for this backend's requests (None: unpaced).
        timeout: seconds per request (None: the backend's default).
        max_retries: retries of a failed request.

    Example:
        >>> config = BackendConfig(backend="moondream", base_url="http://localhost:2020/v1")
        >>> import pickle; pickle.loads(pickle.dumps(config)) == config
        True
        >>> md = config.build()  # in the process that uses it  # doctest: +SKIP
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["moondream", "fal"] = "moondream"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    max_concurrency: int | None = Field(default=8, ge=1)
    requests_per_second: float | None = Field(default=None, gt=0)
    timeout: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=2, ge=0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and (not name or not name.replace("_", "").isalnum() or name[0].isdigit()):
            raise ValueError(f"api_key_env must name an environment variable, got {name!r}")
        return name

    def build(self, *, pacer: Pacer | None = None) -> HttpBackend:
        """The backend, with its key from the environment of this process.

        ``pacer``: a :class:`~moondream_tools._transport.Pacer` every request also waits for
        (a pace shared with other processes, e.g. the one ``moondream_tools.ray`` gives all
        the workers of a job; ``requests_per_second`` above stays this process's own).

        Raises:
            ConfigurationError: ``api_key_env`` names a variable that is not set, or the
                backend needs a key and none is set.
        """
        key = None
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigurationError(
                    f"the environment variable {self.api_key_env} (api_key_env) is not set; set it to the"
                    f" {self.backend} API key"
                )
        options = dict(
            base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries,
            max_concurrency=self.max_concurrency, requests_per_second=self.requests_per_second,
        )
        if self.backend == "fal":
            if self.model is not None:
                raise ConfigurationError("model= is for Moondream servers; fal.ai serves one Moondream model")
            from .providers import FalMoondream

            backend: HttpBackend = FalMoondream(key, **options)  # type: ignore[arg-type]
        else:
            from .client import AsyncMoondream

            backend = AsyncMoondream(key, model=self.model, **options)  # type: ignore[arg-type]
        backend._transport.limiter.pacer = pacer
        return backend
