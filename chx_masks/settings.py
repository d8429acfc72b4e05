"""Every ``CHX_MASKS_*`` environment variable, read in one place; used by both packages.

:func:`settings` reads the environment afresh at each call, so a variable set
after import (in a notebook, or by a test) applies to the next call. An empty
variable counts as unset. A value that cannot be read raises
:class:`~chx_masks.SettingsError` naming the variable, never a silent default.

The README's table of variables is :func:`variables_table` (a test checks
that they agree); ``python -m chx_masks.settings`` prints it.

Examples
--------
>>> import os
>>> from unittest import mock
>>> with mock.patch.dict(os.environ, {"CHX_MASKS_LOCAL_IDLE": "30", "CHX_MASKS_URI": ""}):
...     s = settings()
>>> s.local_idle, s.uri
(30.0, None)
>>> with mock.patch.dict(os.environ, {"CHX_MASKS_API_KEY": "s3cret"}):
...     "s3cret" in repr(settings())
False
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._errors import SettingsError

__all__ = ["PREFIX", "Settings", "settings", "variables_table"]

#: The prefix of every variable.
PREFIX = "CHX_MASKS_"

#: Seconds without a request before a local server stops.
DEFAULT_LOCAL_IDLE = 600.0


class Settings(BaseSettings):
    """chx-masks's configuration from ``CHX_MASKS_*`` environment variables.

    Each field ``name`` is the variable ``CHX_MASKS_<NAME>``; API keys are
    :class:`pydantic.SecretStr`, so no repr shows them.

    Examples
    --------
    >>> Settings(uri="http://127.0.0.1:8000/api/v1/metadata/masks").uri
    'http://127.0.0.1:8000/api/v1/metadata/masks'
    >>> Settings(local_server="off").local_server
    False
    """

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    uri: str | None = Field(
        None, description="tiled server (container URI) holding the registry; beats the others"
    )
    api_key: SecretStr | None = Field(None, description="API key for `CHX_MASKS_URI`")
    profile: str | None = Field(None, description="tiled profile holding the registry")
    dir: Path | None = Field(
        None,
        description="embedded registry's directory (default: the user data directory); "
        "`runs/`, `processed/` and `demo/` go in it",
    )
    cache_dir: Path | None = Field(
        None, description="disk copies of masks read from a server (default: the user cache)"
    )
    local_server: bool = Field(
        True, description="commands share a local server per embedded directory (`0` turns off)"
    )
    local_idle: float = Field(
        DEFAULT_LOCAL_IDLE,
        gt=0,
        description="seconds without a request before a local server stops",
    )
    runs_uri: str | None = Field(
        None, description="tiled container of the runs (default: `runs/` in `CHX_MASKS_DIR`)"
    )
    runs_api_key: SecretStr | None = Field(None, description="API key for `CHX_MASKS_RUNS_URI`")
    processed_uri: str | None = Field(
        None,
        description="tiled container of end-of-run products "
        "(default: `processed/` in `CHX_MASKS_DIR`)",
    )
    processed_api_key: SecretStr | None = Field(
        None, description="API key for `CHX_MASKS_PROCESSED_URI`"
    )
    frames_dir: Path | None = Field(
        None, description="where the profile writes masked frames as HDF5 files"
    )
    decode_threads: int | None = Field(
        None, ge=1, description="threads decoding Eiger chunks (default: the cores, up to 8)"
    )

    def secret(self, name: str) -> str | None:
        """The plain value of the API key field ``name``, or None.

        Examples
        --------
        >>> Settings(api_key="s3cret").secret("api_key")
        's3cret'
        """
        value = getattr(self, name)
        return None if value is None else value.get_secret_value()


def settings() -> Settings:
    """The settings in the environment now.

    Raises
    ------
    SettingsError
        A variable holds a value that cannot be read; the message names it.

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"CHX_MASKS_DECODE_THREADS": "many"}):
    ...     settings()
    Traceback (most recent call last):
    ...
    chx_masks._errors.SettingsError: $CHX_MASKS_DECODE_THREADS='many': ...
    """
    import os

    try:
        return Settings()
    except ValidationError as err:
        problems = []
        for error in err.errors():
            variable = PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            problems.append(f"${variable}={os.environ.get(variable)!r}: {error['msg'].lower()}")
        raise SettingsError(
            "; ".join(problems) + ". Correct the environment variable, or unset it for the "
            "default (the README's 'Environment variables' lists them)."
        ) from err


def variables_table() -> str:
    """The README's table of environment variables, as Markdown.

    Examples
    --------
    >>> print(variables_table().splitlines()[2])
    | `CHX_MASKS_URI` | tiled server (container URI) holding the registry; beats the others |
    """
    lines = ["| Variable | Meaning |", "|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = field.description or ""
        if isinstance(field.default, float):
            meaning += f" (default {field.default:g})"
        lines.append(f"| `{PREFIX}{name.upper()}` | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(variables_table())
