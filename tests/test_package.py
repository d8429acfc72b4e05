"""The public face of the package: exported names, light imports, the command line."""

from __future__ import annotations

import json
import subprocess
import sys

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
    "MaskExistsError",
    "MaskIntegrityError",
    "MaskNotFoundError",
    "MaskPermissionError",
    "MaskRecord",
    "MaskRegistry",
    "MaskValidationError",
    "RegistryUnavailableError",
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


def test_error_tree_inherits_builtins():
    import chx_masks as c

    assert issubclass(c.MaskNotFoundError, KeyError)
    assert issubclass(c.DetectorNotFoundError, c.MaskNotFoundError)
    assert issubclass(c.MaskExistsError, ValueError)
    assert issubclass(c.MaskValidationError, ValueError)
    assert issubclass(c.RegistryUnavailableError, ConnectionError)
    assert issubclass(c.MaskPermissionError, PermissionError)
    for error in (c.MaskNotFoundError, c.MaskExistsError, c.MaskValidationError,
                  c.DetectorNotFoundError, c.MaskIntegrityError,
                  c.RegistryUnavailableError, c.MaskPermissionError):
        assert issubclass(error, c.ChxMasksError)
    # A KeyError subclass still prints its sentence, not a quoted repr.
    assert str(c.MaskNotFoundError("No mask d/n.")) == "No mask d/n."


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
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
