"""API keys never shown: in store URIs, reprs, messages and the command line's stderr.

A key may reach the project inside a URI (``?api_key=...``, as
``$CHX_MASKS_RUNS_URI`` may hold it) or on the command line; neither may
be printed, and the command line can take it from a file instead of a flag
that ``ps`` shows.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bluesky_callbacks._process import (
    RunStore,
    StoreUnavailableError,
    located_store,
    plan_processing,
)
from chx_masks import MaskRegistry
from chx_masks._cli import main

SECRET = "s3cret-key-0123456789"
NOBODY = "http://127.0.0.1:9/api/v1/runs"  # nothing listens on the discard port


def test_a_key_in_a_store_uri_moves_out_of_it():
    store = RunStore(f"{NOBODY}?api_key={SECRET}&x=1")
    assert store.location == f"{NOBODY}?x=1" and store.api_key == SECRET
    assert SECRET not in repr(store) and SECRET not in str(store)
    # An explicit key wins; reading() keeps it.
    store = RunStore(f"{NOBODY}?api_key=other", api_key=SECRET)
    assert store.api_key == SECRET and "other" not in repr(store)


def test_a_key_in_the_environment_uri_is_never_shown(monkeypatch, embedded_dir):
    monkeypatch.setenv("CHX_MASKS_RUNS_URI", f"{NOBODY}?api_key={SECRET}")
    store = located_store(None, "runs")
    assert store.api_key == SECRET and SECRET not in repr(store)
    with (
        MaskRegistry.embedded(embedded_dir) as registry,
        pytest.raises(StoreUnavailableError) as refused,
    ):
        plan_processing("some-run", runs=store, registry=registry)
    assert SECRET not in str(refused.value) and NOBODY in str(refused.value)
    # The command line, with the key in --runs: one line, no key.
    result = CliRunner().invoke(
        main,
        ["--dir", str(embedded_dir), "process", "some-run", "--runs", f"{NOBODY}?api_key={SECRET}"],
    )
    assert result.exit_code == 1, result.output
    assert SECRET not in result.output and "Traceback" not in result.output
    assert result.output.startswith("chx-masks: ") and NOBODY in result.output


def test_the_command_line_reads_the_key_from_a_file(
    tiled_server, server_registry_uri, tmp_path, monkeypatch
):
    monkeypatch.delenv("CHX_MASKS_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(f"{tiled_server.api_key}\n")
    key_file.chmod(0o600)
    runner = CliRunner()
    listed = runner.invoke(
        main, ["--uri", server_registry_uri, "--api-key-file", str(key_file), "list"]
    )
    assert listed.exit_code == 0, listed.output
    assert "No masks registered" in listed.output
    assert tiled_server.api_key not in listed.output
    # Without a key the same server refuses, and says so in one line.
    refused = runner.invoke(main, ["--uri", server_registry_uri, "list"])
    assert refused.exit_code == 1 and refused.output.startswith("chx-masks: ")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, said in ((empty, "is empty"), (tmp_path / "missing", "cannot read")):
        bad = runner.invoke(
            main, ["--uri", server_registry_uri, "--api-key-file", str(path), "list"]
        )
        assert bad.exit_code == 2 and said in bad.output and "--api-key-file" in bad.output
    both = runner.invoke(
        main,
        ["--uri", server_registry_uri, "--api-key", "k", "--api-key-file", str(key_file), "list"],
    )
    assert both.exit_code == 2 and "not both" in both.output
