"""The public face of the package: exported names, light imports, the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fresh import command_modules

import chx_masks

PUBLIC = {
    "ActiveSet",
    "BUILTIN_DETECTORS",
    "ChxMasksError",
    "ComponentExplanation",
    "CompositeMask",
    "DetectorNotFoundError",
    "DetectorRecord",
    "Explanation",
    "FrameShapeError",
    "MaskDiff",
    "MaskExistsError",
    "MaskInUseError",
    "MaskIntegrityError",
    "MaskNotFoundError",
    "MaskPermissionError",
    "MaskPurgedError",
    "MaskRecord",
    "MaskRegistry",
    "MaskValidationError",
    "RegistryUnavailableError",
    "SettingsError",
    "TimeLike",
    "__version__",
    "default_registry",
    "delete_mask",
    "get_composite_mask",
    "get_mask",
    "get_mask_uid",
    "get_masks",
    "mask_sha256",
    "register_mask",
    "set_default_registry",
}


def test_exported_members_are_exactly_the_public_api():
    assert set(chx_masks.__all__) == PUBLIC
    assert len(chx_masks.__all__) == len(PUBLIC)
    for name in PUBLIC:
        assert getattr(chx_masks, name) is not None


BLUESKY_PUBLIC = {
    "DetectorMasks",
    "EigerSeriesToStream",
    "LeaseLostError",
    "MaskProvenance",
    "MaskingRouter",
    "ProcessedRun",
    "ProcessingError",
    "ProcessingPlan",
    "ProductFrames",
    "RunMasks",
    "RunStore",
    "RunUse",
    "StoreUnavailableError",
    "find_run",
    "lineage_uids",
    "mask_provenance_decorator",
    "mask_provenance_wrapper",
    "masked_frames",
    "open_run_store",
    "plan_processing",
    "process_run",
    "replay_masked",
    "run_composite",
    "run_masks",
    "runs_using",
    "write_product",
}


def test_bluesky_callbacks_exports_exactly_its_public_api():
    import bluesky_callbacks

    assert set(bluesky_callbacks.__all__) == BLUESKY_PUBLIC
    assert len(bluesky_callbacks.__all__) == len(BLUESKY_PUBLIC)
    for name in BLUESKY_PUBLIC:
        assert getattr(bluesky_callbacks, name) is not None


def test_error_tree_inherits_builtins():
    import chx_masks as c

    assert issubclass(c.MaskNotFoundError, KeyError)
    assert issubclass(c.DetectorNotFoundError, c.MaskNotFoundError)
    assert issubclass(c.MaskExistsError, ValueError)
    assert issubclass(c.MaskValidationError, ValueError)
    assert issubclass(c.RegistryUnavailableError, ConnectionError)
    assert issubclass(c.MaskPermissionError, PermissionError)
    assert issubclass(c.SettingsError, ValueError)
    for error in (
        c.MaskNotFoundError,
        c.MaskExistsError,
        c.MaskValidationError,
        c.DetectorNotFoundError,
        c.MaskIntegrityError,
        c.RegistryUnavailableError,
        c.MaskPermissionError,
        c.SettingsError,
    ):
        assert issubclass(error, c.ChxMasksError)
    # A KeyError subclass still prints its sentence, not a quoted repr.
    assert str(c.MaskNotFoundError("No mask d/n.")) == "No mask d/n."
    assert issubclass(c.FrameShapeError, c.MaskValidationError)


def test_the_bluesky_integrations_errors_join_the_tree():
    import bluesky_callbacks as b
    import chx_masks as c

    assert issubclass(b.ProcessingError, c.ChxMasksError)
    assert issubclass(b.ProcessingError, RuntimeError)
    assert issubclass(b.StoreUnavailableError, b.ProcessingError)
    assert issubclass(b.StoreUnavailableError, ConnectionError)
    assert issubclass(b.LeaseLostError, b.ProcessingError)


def test_frames_of_another_shape_raise_one_error_wherever_a_mask_meets_them(tmp_path):
    import numpy as np

    import chx_masks as c
    from bluesky_callbacks._frames import prepare_mask
    from chx_masks.plot import frame_png

    with c.MaskRegistry.embedded(tmp_path / "reg") as reg:
        uid = reg.register_mask("eiger500K_single_image", "m", np.ones((514, 1030), bool))
        composite = reg.composite_from_uids([uid])
    wrong = (3, 512, 1024)
    raised = []
    for attempt in (
        lambda: composite.check_frames(wrong),
        lambda: prepare_mask(composite, np.uint32, wrong),
        lambda: frame_png(
            np.zeros(wrong[1:], np.uint32), tmp_path / "f.png", title="f", mask=composite.mask
        ),
    ):
        with pytest.raises(c.FrameShapeError, match="512x1024 but the mask") as info:
            attempt()
        raised.append(info.value)
    assert all("another shape" in str(err) for err in raised)
    assert not (tmp_path / "f.png").exists()


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_registry_library_does_not_import_bluesky():
    modules = _modules_after("import chx_masks; chx_masks.MaskRegistry")
    assert not {m for m in modules if m.split(".")[0] in {"bluesky", "ophyd", "event_model"}}


def test_cli_help_imports_nothing_heavy():
    modules = _modules_after("from chx_masks._cli import main")
    # numpy (~0.1 s) is fine; tiled, dask and the server stack are seconds.
    heavy = {"tiled", "dask", "httpx", "sqlalchemy", "fastapi", "pandas", "zarr"}
    assert not {m for m in modules if m.split(".")[0] in heavy}


# What tiled's server side imports (tiled.server.app and tiled.catalog, through
# tiled.adapters.protocols) whatever it serves: seconds of start-up that a
# client of a server must not pay.
SERVER_STACK = {"sqlalchemy", "alembic", "fastapi", "starlette", "strawberry", "blosc2"}
TILED_SERVER_SIDE = ("tiled.catalog", "tiled.server", "tiled.adapters")
# dask.array imports pandas, xarray, scipy and sparse (numba) where installed;
# tiled's array client imports dask.array. Listing reads no array.
DATA_STACK = {"dask", "pandas", "pyarrow", "xarray", "sparse", "numba", "scipy"}
# Never needed to list a registry, embedded or not.
NOT_FOR_LISTING = {
    "bluesky",
    "ophyd",
    "event_model",
    "matplotlib",
    "PIL",
    "h5py",
    "zarr",
    "tifffile",
    "fabio",
    "pyFAI",
    "distributed",
    "prefect",
    "IPython",
}
CHX_EXTRAS = ("chx_masks.io", "chx_masks.generate", "chx_masks._plot", "chx_masks._serve")


def _imported(modules: set[str], packages: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in packages}


def _under(modules: set[str], names: tuple[str, ...]) -> set[str]:
    """The modules in ``names`` and their submodules."""
    return {m for m in modules if m in names or m.startswith(tuple(f"{n}." for n in names))}


@pytest.fixture(scope="module")
def server_listing(tiled_server) -> tuple[str, set[str]]:
    """``chx-masks --uri URI list`` of a registry on a loopback server that holds a mask."""
    import uuid

    import numpy as np
    from tiled.client import from_uri

    key = f"test-{uuid.uuid4().hex[:12]}"
    root = from_uri(tiled_server.uri)
    root.create_container(key=key)
    root.context.close()
    uri = f"http://127.0.0.1:{tiled_server.port}/api/v1/metadata/{key}"
    with chx_masks.MaskRegistry.from_uri(uri, api_key=tiled_server.api_key) as reg:
        reg.register_mask("eiger500K_single_image", "gap", np.ones((514, 1030), dtype=bool))
    return command_modules(["--uri", uri, "list"], CHX_MASKS_API_KEY=tiled_server.api_key)


def test_listing_a_server_registry_imports_no_server_side(server_listing):
    output, modules = server_listing
    assert "gap" in output
    assert "tiled.client" in modules
    assert not _imported(modules, SERVER_STACK | NOT_FOR_LISTING)
    assert not _under(modules, TILED_SERVER_SIDE + CHX_EXTRAS)


def test_listing_a_server_registry_imports_no_dask(server_listing):
    _, modules = server_listing
    assert not _imported(modules, DATA_STACK)


def test_listing_an_embedded_registry_imports_no_more_than_tiled_serves_with(tmp_path):
    import numpy as np

    directory = tmp_path / "registry"
    with chx_masks.MaskRegistry.embedded(directory) as reg:
        reg.register_mask("eiger500K_single_image", "gap", np.ones((514, 1030), dtype=bool))
    output, modules = command_modules(["--dir", str(directory), "list"])
    assert "gap" in output
    # The in-process server needs tiled's server side (and, through it, dask).
    assert "tiled.server.app" in modules
    assert not _imported(modules, NOT_FOR_LISTING)
    assert not _under(modules, CHX_EXTRAS)


def test_opening_an_embedded_registry_leaves_the_garbage_collector_as_it_was(tmp_path):
    import gc

    assert gc.isenabled()
    with chx_masks.MaskRegistry.embedded(tmp_path / "a"):
        assert gc.isenabled()
    gc.disable()
    try:
        with chx_masks.MaskRegistry.embedded(tmp_path / "b"):
            assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_process_entry_point_skips_the_collection_at_exit():
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
        "sys.argv = ['chx-masks', '--version']\n"
        "from chx_masks.__main__ import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "version" in done.stdout
    assert int(done.stdout.split("frozen")[1]) > 0
