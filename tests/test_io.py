"""Mask files in and out: every format, files made by users' own libraries, bad files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import EIGER500K, SHAPE_500K, random_mask

from chx_masks import MaskExistsError, MaskValidationError
from chx_masks.io import (
    NEXUS_PIXEL_MASK,
    export_convention,
    export_mask,
    ingest_master_file,
    read_mask,
    register_from_file,
    write_mask,
)

SUFFIXES = {
    "npy": ".npy",
    "npz": ".npz",
    "tiff": ".tif",
    "edf": ".edf",
    "msk": ".msk",
    "nexus": ".h5",
    "indices": ".txt",
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eiger_master(path: Path, pixel_mask: np.ndarray, where: str = NEXUS_PIXEL_MASK) -> Path:
    """An Eiger-like master file written with plain h5py, as the firmware lays it out."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset(where, data=pixel_mask.astype(np.uint32))
        f.create_dataset(
            "/entry/instrument/detector/detectorSpecific/x_pixels_in_detector",
            data=pixel_mask.shape[1],
        )
        f["/entry/data/data_000001"] = h5py.ExternalLink("scan_data_000001.h5", "/entry/data/data")
    return path


def bad_pixels() -> np.ndarray:
    """Eiger-style flags: 0 good, bit values for dead/hot/gap pixels."""
    flags = np.zeros(SHAPE_500K, dtype=np.uint32)
    flags[0, 0] = 1
    flags[10, 20] = 2
    flags[:, 512:514] = 16
    return flags


# --------------------------------------------------------------- round trips


#: The convention each format is written in without ``convention=`` (TIFF: none).
EXPORT_DEFAULTS = {
    "npy": "keep",
    "npz": "keep",
    "tiff": None,
    "edf": "masked-nonzero",
    "msk": "masked-nonzero",
    "nexus": "masked-nonzero",
    "indices": "masked-nonzero",
}


@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_our_writer_round_trips(tmp_path, fmt):
    mask = random_mask()
    convention = "keep" if fmt == "tiff" else None  # TIFF is only written when told how
    path = write_mask(mask, tmp_path / f"m{SUFFIXES[fmt]}", convention=convention)
    back, source = read_mask(path, shape=SHAPE_500K if fmt == "indices" else None)
    assert back.dtype == np.bool_
    np.testing.assert_array_equal(back, mask)
    assert source["format"] == fmt
    assert source["file_sha256"] == sha256_of(path)
    assert source["path"] == str(path) and Path(source["path"]).is_absolute()


@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_convention_override_round_trips(tmp_path, fmt):
    mask = random_mask(seed=3)
    default = {"npy": "keep", "npz": "keep", "tiff": "keep"}.get(fmt, "masked-nonzero")
    other = "keep" if default == "masked-nonzero" else "masked-nonzero"
    path = write_mask(mask, tmp_path / f"m{SUFFIXES[fmt]}", convention=other)
    shape = SHAPE_500K if fmt == "indices" else None
    back, source = read_mask(path, convention=other, shape=shape)
    np.testing.assert_array_equal(back, mask)
    assert source["convention"] == other
    # Read with the format's default, the same file is the inverted mask.
    if fmt in ("edf", "msk", "nexus", "indices"):
        np.testing.assert_array_equal(read_mask(path, shape=shape)[0], ~mask)


def test_explicit_format_ignores_suffix(tmp_path):
    mask = random_mask()
    path = write_mask(mask, tmp_path / "mask.data", format="npy")
    assert path.name == "mask.data"  # not "mask.data.npy"
    np.testing.assert_array_equal(read_mask(path, format="npy")[0], mask)


def test_np_save_bool(tmp_path):
    mask = random_mask()
    np.save(tmp_path / "m.npy", mask)
    back, source = read_mask(tmp_path / "m.npy")
    np.testing.assert_array_equal(back, mask)
    assert source["convention"] == "keep"
    assert "dataset" not in source


def test_np_save_integer_needs_convention(tmp_path):
    mask = random_mask()
    np.save(tmp_path / "m.npy", mask.astype(np.uint8))
    with pytest.raises(MaskValidationError, match=r"m\.npy.*convention="):
        read_mask(tmp_path / "m.npy")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.npy", convention="keep")[0], mask)
    np.testing.assert_array_equal(
        read_mask(tmp_path / "m.npy", convention="masked-nonzero")[0], ~mask
    )


def test_np_savez_single_and_named(tmp_path):
    mask = random_mask()
    np.savez(tmp_path / "one.npz", mask)
    back, source = read_mask(tmp_path / "one.npz")
    np.testing.assert_array_equal(back, mask)
    assert source["dataset"] == "arr_0"
    np.savez(tmp_path / "two.npz", gap=mask, other=~mask)
    with pytest.raises(MaskValidationError, match=r"two\.npz.*gap.*other.*dataset="):
        read_mask(tmp_path / "two.npz")
    np.testing.assert_array_equal(read_mask(tmp_path / "two.npz", dataset="other")[0], ~mask)
    with pytest.raises(MaskValidationError, match=r"two\.npz.*no array 'nope'.*gap, other"):
        read_mask(tmp_path / "two.npz", dataset="nope")


def test_tifffile_imwrite(tmp_path):
    import tifffile

    mask = random_mask()
    tifffile.imwrite(tmp_path / "m.tiff", mask)
    back, source = read_mask(tmp_path / "m.tiff")
    np.testing.assert_array_equal(back, mask)
    assert source["libraries"]["tifffile"] == tifffile.__version__
    tifffile.imwrite(tmp_path / "pyfai.tif", (~mask).astype(np.int8))
    np.testing.assert_array_equal(
        read_mask(tmp_path / "pyfai.tif", convention="masked-nonzero")[0], mask
    )


def test_fabio_edf_nonzero_is_masked(tmp_path):
    import fabio
    from fabio.edfimage import EdfImage

    data = np.zeros(SHAPE_500K, dtype=np.int32)
    data[7, 9] = 1
    data[100, 200] = 5  # any nonzero value is masked in pyFAI
    EdfImage(data=data).write(str(tmp_path / "pyfai.edf"))
    mask, source = read_mask(tmp_path / "pyfai.edf")
    assert not mask[7, 9] and not mask[100, 200]
    assert mask[0, 0] and int((~mask).sum()) == 2
    assert source["convention"] == "masked-nonzero"
    assert source["libraries"]["fabio"] == fabio.version
    binary = (data != 0).astype(np.uint8)
    EdfImage(data=binary).write(str(tmp_path / "kept.edf"))
    kept, _ = read_mask(tmp_path / "kept.edf", convention="keep")
    assert kept[7, 9] and not kept[0, 0]


def test_fabio_edf_keep_refuses_flags(tmp_path):
    from fabio.edfimage import EdfImage

    data = np.zeros(SHAPE_500K, dtype=np.int32)
    data[100, 200] = 5
    EdfImage(data=data).write(str(tmp_path / "flags.edf"))
    with pytest.raises(MaskValidationError, match=r"flags\.edf.*other than 0 and 1"):
        read_mask(tmp_path / "flags.edf", convention="keep")


def test_fabio_fit2d_mask(tmp_path):
    from fabio.fit2dmaskimage import Fit2dMaskImage

    data = np.zeros(SHAPE_500K, dtype=np.uint8)
    data[3, 5] = 1
    data[513, 1029] = 1
    Fit2dMaskImage(data=data).write(str(tmp_path / "fit2d.msk"))
    mask, source = read_mask(tmp_path / "fit2d.msk")
    assert mask.shape == SHAPE_500K
    assert not mask[3, 5] and not mask[513, 1029] and int((~mask).sum()) == 2
    assert source["format"] == "msk"


def test_h5py_eiger_master(tmp_path):
    import h5py

    path = eiger_master(tmp_path / "scan_master.h5", bad_pixels())
    mask, source = read_mask(path)
    np.testing.assert_array_equal(mask, bad_pixels() == 0)
    assert not mask[10, 20] and mask[10, 21]
    assert source["dataset"] == NEXUS_PIXEL_MASK
    assert source["format"] == "nexus"
    assert source["libraries"]["h5py"] == h5py.__version__


def test_h5py_pixel_mask_elsewhere_is_found(tmp_path):
    path = eiger_master(tmp_path / "other.nxs", bad_pixels(), "/entry/detector/pixel_mask")
    mask, source = read_mask(path)
    np.testing.assert_array_equal(mask, bad_pixels() == 0)
    assert source["dataset"] == "/entry/detector/pixel_mask"


def test_np_savetxt_indices(tmp_path):
    mask = random_mask()
    np.savetxt(tmp_path / "float.txt", np.flatnonzero(~mask))  # numpy's default: '%.18e'
    np.savetxt(tmp_path / "int.txt", np.flatnonzero(~mask), fmt="%d")
    for name in ("float.txt", "int.txt"):
        back, source = read_mask(tmp_path / name, shape=SHAPE_500K)
        np.testing.assert_array_equal(back, mask)
        assert source["format"] == "indices"
    kept, _ = read_mask(tmp_path / "int.txt", shape=SHAPE_500K, convention="keep")
    np.testing.assert_array_equal(kept, ~mask)


def test_empty_index_list_masks_nothing(tmp_path):
    (tmp_path / "none.txt").write_text("")
    mask, _ = read_mask(tmp_path / "none.txt", shape=(3, 4))
    assert mask.all() and mask.shape == (3, 4)


def test_source_is_json_with_plain_keys(tmp_path):
    import json

    import chx_masks

    path = write_mask(random_mask(), tmp_path / "m.npz")
    _, source = read_mask(path)
    assert json.loads(json.dumps(source)) == source
    assert source["chx_masks"] == chx_masks.__version__
    assert source["libraries"]["numpy"] == np.__version__

    def keys(d):
        for k, v in d.items():
            yield k
            if isinstance(v, dict):
                yield from keys(v)

    assert not [k for k in keys(source) if "." in k]


@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_each_format_writes_its_own_convention(tmp_path, fmt):
    assert export_convention(fmt) == EXPORT_DEFAULTS[fmt]
    if fmt == "tiff":
        return
    mask = random_mask(seed=4)
    path = write_mask(mask, tmp_path / f"m{SUFFIXES[fmt]}")
    shape = SHAPE_500K if fmt == "indices" else None
    # Read back with that convention named explicitly: the same mask.
    back, _ = read_mask(path, convention=EXPORT_DEFAULTS[fmt], shape=shape)
    np.testing.assert_array_equal(back, mask)


def test_tiff_is_written_only_with_a_convention(tmp_path):
    import tifffile

    mask = random_mask(seed=6)
    with pytest.raises(MaskValidationError) as info:
        write_mask(mask, tmp_path / "m.tif")
    assert (
        "convention='masked-nonzero' (nonzero = masked, as pyFAI and fabio read it) or "
        "convention='keep'" in str(info.value)
    )
    assert info.value.cli_message.endswith(
        "TIFF masks are read both ways, so the convention to write must be given: "
        "--convention masked-nonzero (pyFAI, fabio) or --convention keep (chx-masks)."
    )
    assert not (tmp_path / "m.tif").exists()
    # As pyFAI and fabio read a TIFF mask: nonzero = masked.
    pyfai = write_mask(mask, tmp_path / "pyfai.tif", convention="masked-nonzero")
    np.testing.assert_array_equal(tifffile.imread(pyfai) != 0, ~mask)
    np.testing.assert_array_equal(read_mask(pyfai, convention="masked-nonzero")[0], mask)
    # As chx-masks reads a bool TIFF without being told: True = kept.
    kept = write_mask(mask, tmp_path / "kept.tif", convention="keep")
    assert tifffile.imread(kept).dtype == np.bool_
    np.testing.assert_array_equal(read_mask(kept)[0], mask)


def test_write_refuses_non_bool(tmp_path):
    with pytest.raises(MaskValidationError, match="2-D bool"):
        write_mask(np.ones(SHAPE_500K, dtype=np.uint8), tmp_path / "m.npy")
    assert not (tmp_path / "m.npy").exists()


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize("fmt", ["npy", "edf", "nexus", "indices", "msk"])
def test_register_from_file_records_source(registry, tmp_path, fmt):
    mask = random_mask(seed=5)
    path = write_mask(mask, tmp_path / f"chip{SUFFIXES[fmt]}")
    uid = register_from_file(registry, EIGER500K, "chip", path, metadata={"sample": "silica"})
    record = registry.describe(uid)
    source = record.metadata["source"]
    assert source["file_name"] == path.name
    assert source["format"] == fmt
    assert source["convention"] == ("keep" if fmt == "npy" else "masked-nonzero")
    assert source["file_sha256"] == sha256_of(path)
    assert record.metadata["sample"] == "silica"
    np.testing.assert_array_equal(registry.get_mask(EIGER500K, "chip").compute(), mask)


def test_register_from_file_update_keeps_metadata(registry, tmp_path):
    first = write_mask(random_mask(seed=1), tmp_path / "v0.npy")
    second = write_mask(random_mask(seed=2), tmp_path / "v1.edf")
    register_from_file(registry, EIGER500K, "chip", first, metadata={"sample": "silica"})
    uid = register_from_file(registry, EIGER500K, "chip", second, update=True)
    record = registry.describe(uid)
    assert record.version == 1
    assert record.metadata["sample"] == "silica"
    assert record.metadata["source"]["file_name"] == "v1.edf"


@pytest.mark.parametrize("fmt", ["npy", "edf", "msk", "nexus", "indices", "tiff", "npz"])
def test_export_then_read_equals_registered(registry, tmp_path, fmt):
    mask = random_mask(seed=7)
    uid = registry.register_mask(EIGER500K, "beamstop", mask)
    registry.update_mask(EIGER500K, "beamstop", ~mask)
    # A TIFF is exported as pyFAI reads it, when asked to.
    write = {"convention": "masked-nonzero"} if fmt == "tiff" else {}
    read = {"shape": SHAPE_500K} if fmt == "indices" else dict(write)
    path = export_mask(
        registry, EIGER500K, "beamstop", tmp_path / f"out{SUFFIXES[fmt]}", version=0, **write
    )
    np.testing.assert_array_equal(read_mask(path, **read)[0], mask)
    by_uid = export_mask(
        registry, EIGER500K, "beamstop", tmp_path / f"uid{SUFFIXES[fmt]}", uid=uid[:8], **write
    )  # a unique prefix names the uid
    np.testing.assert_array_equal(read_mask(by_uid, **read)[0], mask)
    current = export_mask(
        registry, EIGER500K, "beamstop", tmp_path / f"cur{SUFFIXES[fmt]}", **write
    )
    np.testing.assert_array_equal(read_mask(current, **read)[0], ~mask)


def test_export_tiff_without_convention_writes_nothing(registry, tmp_path):
    registry.register_mask(EIGER500K, "beamstop", random_mask(seed=9))
    for name, format in (("out.tif", None), ("out.tiff", None), ("out.img", "tiff")):
        with pytest.raises(
            MaskValidationError,
            match=r"convention='masked-nonzero' "
            r"\(nonzero = masked, as pyFAI and fabio read it\)",
        ) as info:
            export_mask(registry, EIGER500K, "beamstop", tmp_path / name, format=format)
        assert "--convention masked-nonzero (pyFAI, fabio)" in info.value.cli_message
        assert not (tmp_path / name).exists()


def test_register_from_file_update_of_the_same_mask_needs_force(registry, tmp_path):
    path = write_mask(random_mask(seed=3), tmp_path / "bs.edf")
    first = register_from_file(registry, EIGER500K, "bs", path, metadata={"sample": "a"})
    with pytest.raises(MaskExistsError, match="force=True") as info:
        register_from_file(registry, EIGER500K, "bs", path, update=True)
    assert "--force" in info.value.cli_message and "force=True" not in info.value.cli_message
    assert [r.uid for r in registry.history(EIGER500K, "bs")] == [first]
    again = register_from_file(registry, EIGER500K, "bs", path, update=True, force=True)
    record = registry.describe(again)
    assert record.version == 1 and record.sha256 == registry.describe(first).sha256
    assert record.metadata["sample"] == "a" and record.metadata["source"]["file_name"] == "bs.edf"
    with pytest.raises(MaskValidationError, match="'source'"):
        register_from_file(
            registry, EIGER500K, "bs", path, update=True, force=True, metadata={"source": "me"}
        )
    assert len(registry.history(EIGER500K, "bs")) == 2


def test_exported_edf_is_what_pyfai_expects(registry, tmp_path):
    import fabio

    mask = random_mask(seed=8)
    registry.register_mask(EIGER500K, "beamstop", mask)
    path = export_mask(registry, EIGER500K, "beamstop", tmp_path / "for_pyfai.edf")
    with fabio.open(str(path)) as image:
        np.testing.assert_array_equal(image.data != 0, ~mask)


def test_export_uid_of_other_lineage_is_refused(registry, tmp_path):
    uid = registry.register_mask(EIGER500K, "a", random_mask())
    with pytest.raises(MaskValidationError, match="not eiger500K_single_image/b"):
        export_mask(registry, EIGER500K, "b", tmp_path / "x.npy", uid=uid)
    assert not (tmp_path / "x.npy").exists()


def test_ingest_master_file_once_per_content(registry, tmp_path):
    flags = bad_pixels()
    path = eiger_master(tmp_path / "a_master.h5", flags)
    uid, created = ingest_master_file(registry, EIGER500K, "pixel_mask", path)
    assert created
    np.testing.assert_array_equal(registry.get_mask_by_uid(uid).compute(), flags == 0)
    assert registry.describe(uid).metadata["source"]["file_sha256"] == sha256_of(path)

    # Same pixel mask in another master file (other bytes): nothing new.
    same = eiger_master(tmp_path / "b_master.h5", flags)
    again, created_again = ingest_master_file(registry, EIGER500K, "pixel_mask", same)
    assert (again, created_again) == (uid, False)
    assert len(registry.history(EIGER500K, "pixel_mask")) == 1

    flags[200, 300] = 8
    changed = eiger_master(tmp_path / "c_master.h5", flags)
    new_uid, created_new = ingest_master_file(registry, EIGER500K, "pixel_mask", changed)
    assert created_new and new_uid != uid
    history = registry.history(EIGER500K, "pixel_mask")
    assert [r.version for r in history] == [0, 1]
    assert registry.describe(new_uid).metadata["source"]["file_name"] == "c_master.h5"
    assert not registry.get_mask(EIGER500K, "pixel_mask").compute()[200, 300]


# ----------------------------------------------------------------- bad input


def _truncated_npy(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, random_mask())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, {}, "not a readable .npy"


def _truncated_edf(tmp_path):
    path = write_mask(random_mask(), tmp_path / "cut.edf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, {}, "truncated"


def _truncated_h5(tmp_path):
    path = eiger_master(tmp_path / "cut_master.h5", bad_pixels())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, {}, "HDF5"


def _truncated_msk(tmp_path):
    path = write_mask(random_mask(), tmp_path / "cut.msk")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, {}, "Fit2D"


def _truncated_tiff(tmp_path):
    path = write_mask(random_mask(), tmp_path / "cut.tif", convention="keep")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, {}, "TIFF"


def _text_as(suffix, expected):
    def make(tmp_path):
        path = tmp_path / f"notes{suffix}"
        path.write_text("beamstop at 512, 300\nremember to check the gap\n")
        return path, {}, expected

    return make


def _wrong_shape(tmp_path):
    path = tmp_path / "small.npy"
    np.save(path, np.ones((100, 100), dtype=bool))
    return path, {}, "100x100.*514x1030"


def _transposed(tmp_path):
    path = tmp_path / "transposed.npy"
    np.save(path, np.ones(SHAPE_500K[::-1], dtype=bool))
    return path, {}, "transposed"


def _array(name, array, expected):
    def make(tmp_path):
        path = tmp_path / name
        np.save(path, array)
        return path, {"convention": "keep"}, expected

    return make


def _missing_dataset(tmp_path):
    import h5py

    path = tmp_path / "no_mask_master.h5"
    with h5py.File(path, "w") as f:
        f["/entry/data/frame"] = np.zeros((2, 2))
        f["/entry/instrument/detector/count_time"] = 1.0
    return path, {}, r"/entry/data/frame.*count_time|count_time.*/entry/data/frame"


def _named_missing_dataset(tmp_path):
    path = eiger_master(tmp_path / "named_master.h5", bad_pixels())
    return path, {"dataset": "/entry/mask"}, "'/entry/mask'.*Datasets found: .*pixel_mask"


def _missing_file(tmp_path):
    return tmp_path / "nowhere.npy", {}, "does not exist"


def _txt_no_shape(tmp_path):
    path = tmp_path / "indices.txt"
    np.savetxt(path, [1, 2, 3], fmt="%d")
    return path, {}, "shape="


def _txt_out_of_range(tmp_path):
    path = tmp_path / "far.txt"
    np.savetxt(path, [0, 514 * 1030], fmt="%d")
    return path, {}, "outside 0..529419"


def _unknown_suffix(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(b"\x89PNG")
    return path, {}, "suffix '.png'"


def _object_npy(tmp_path):
    """What np.save writes for an array of Python objects: a pickle inside an .npy."""
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"beamstop": (1, 2)}, None], dtype=object), allow_pickle=True)
    return path, {}, "holds Python objects"


def _pickle_as_npy(tmp_path):
    import pickle

    path = tmp_path / "pickled.npy"
    path.write_bytes(pickle.dumps({"mask": [[True, False]]}))
    return path, {}, "holds Python objects"


def _object_npz(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, mask=np.array([{"beamstop": 1}], dtype=object))
    return path, {}, "holds Python objects"


BAD = {
    "truncated-npy": _truncated_npy,
    "truncated-edf": _truncated_edf,
    "truncated-h5": _truncated_h5,
    "truncated-msk": _truncated_msk,
    "truncated-tiff": _truncated_tiff,
    "text-as-npy": _text_as(".npy", "not a readable .npy"),
    "text-as-edf": _text_as(".edf", "not an EDF image"),
    "text-as-h5": _text_as(".h5", "not a readable HDF5"),
    "text-as-npz": _text_as(".npz", "not a readable .npz"),
    "text-as-tiff": _text_as(".tiff", "not a readable TIFF"),
    "text-as-msk": _text_as(".msk", "not a Fit2D mask"),
    "text-as-txt": _text_as(".txt", "not a list of flat pixel indices"),
    "wrong-shape": _wrong_shape,
    "transposed": _transposed,
    "float-not-binary": _array("float.npy", np.full(SHAPE_500K, 0.5), "float values other"),
    "complex": _array("complex.npy", np.ones(SHAPE_500K, dtype=complex), "complex"),
    "strings": _array("strings.npy", np.full(SHAPE_500K, "x"), "<U1"),
    "3-D": _array("stack.npy", np.ones((2, *SHAPE_500K), dtype=bool), "3-D"),
    "missing-dataset": _missing_dataset,
    "named-missing-dataset": _named_missing_dataset,
    "missing-file": _missing_file,
    "txt-out-of-range": _txt_out_of_range,
    "unknown-suffix": _unknown_suffix,
    "object-npy": _object_npy,
    "pickle-as-npy": _pickle_as_npy,
    "object-npz": _object_npz,
}


def _state(registry):
    return registry.get_masks(include_retired=True), sorted(registry._root)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_registers_nothing(registry, tmp_path, case):
    registry.register_mask(EIGER500K, "existing", random_mask())
    before = _state(registry)
    path, read_kw, expected = BAD[case](tmp_path)
    with pytest.raises(MaskValidationError, match=expected) as info:
        register_from_file(registry, EIGER500K, "from_file", path, **read_kw)
    assert path.name in str(info.value)
    assert "allow_pickle" not in str(info.value)  # numpy's advice to load it unsafely
    assert _state(registry) == before
    assert registry.get_masks(include_retired=True) == [(EIGER500K, "existing")]


@pytest.mark.parametrize("case", ["truncated-h5", "text-as-h5", "missing-dataset", "wrong-shape"])
def test_bad_master_file_ingests_nothing(registry, tmp_path, case):
    before = _state(registry)
    path, read_kw, expected = BAD[case](tmp_path)
    if path.suffix == ".npy":
        path = path.rename(path.with_suffix(".h5"))
        expected = "HDF5"
    with pytest.raises(MaskValidationError, match=expected) as info:
        ingest_master_file(registry, EIGER500K, "pixel_mask", path, **read_kw)
    assert path.name in str(info.value)
    assert _state(registry) == before


def test_bad_read_errors_name_the_file(tmp_path):
    path, _, _ = _txt_no_shape(tmp_path)
    with pytest.raises(MaskValidationError, match=r"indices\.txt.*shape=\(rows, cols\)"):
        read_mask(path)
    with pytest.raises(MaskValidationError, match=r"indices\.txt.*convention='sideways'"):
        read_mask(path, convention="sideways", shape=(2, 2))
    with pytest.raises(MaskValidationError, match=r"indices\.txt.*format='png'"):
        read_mask(path, format="png")
    for case in ("float-not-binary", "3-D", "complex", "truncated-edf", "missing-dataset"):
        p, kw, expected = BAD[case](tmp_path)
        with pytest.raises(MaskValidationError, match=expected) as info:
            read_mask(p, **kw)
        assert p.name in str(info.value)


@pytest.mark.parametrize("case", ["object-npy", "pickle-as-npy", "object-npz"])
def test_pickled_data_is_refused_without_numpy_advice(tmp_path, case):
    path, read_kw, _ = BAD[case](tmp_path)
    with pytest.raises(MaskValidationError) as info:
        read_mask(path, **read_kw)
    message = str(info.value)
    assert message == (
        f"Mask file '{path}': holds Python objects (pickled data), not a mask "
        "array, and is refused: loading pickled data can run code from the "
        "file. A mask file holds a plain bool or integer array."
    )
    # numpy's "load it unsafely with allow_pickle=" is neither said nor chained.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def _python_and_cli(tmp_path):
    """Files whose refusal advises an argument; (path, read_kw, Python words, CLI words)."""
    ints = tmp_path / "ints.npy"
    np.save(ints, random_mask().astype(np.uint8))
    flags = tmp_path / "flags.npy"
    np.save(flags, bad_pixels())
    two = tmp_path / "two.npz"
    np.savez(two, gap=random_mask(), other=random_mask())
    archive_as_npy = tmp_path / "archive.npy"
    archive_as_npy.write_bytes(two.read_bytes())
    unknown = tmp_path / "mask.dat"
    unknown.write_bytes(b"0")
    no_mask = _missing_dataset(tmp_path)[0]
    return [
        (
            ints,
            {},
            "Pass convention='keep' (1 = pixel kept, as in chx_masks) or "
            "convention='masked-nonzero'",
            "Give --convention keep (1 = pixel kept, as in "
            "chx-masks) or --convention masked-nonzero (nonzero = masked, as in pyFAI).",
        ),
        (
            flags,
            {"convention": "keep"},
            "which convention='keep' cannot read; is it convention='masked-nonzero'?",
            "which --convention keep cannot read; is it --convention masked-nonzero?",
        ),
        (two, {}, "or pass dataset= naming the mask.", "or give --dataset NAME naming the mask."),
        (
            archive_as_npy,
            {},
            "name it .npz or pass format='npz'.",
            "name it .npz or give --format npz.",
        ),
        (unknown, {}, "or pass format= (one of", "or give --format (one of"),
        (no_mask, {}, "Pass dataset= naming the mask.", "Give --dataset PATH naming the mask."),
        (
            ints,
            {"convention": "sideways"},
            "convention='sideways' is not one of",
            "--convention 'sideways' is not one of keep, masked-nonzero",
        ),
    ]


def test_refusals_carry_the_command_lines_words(tmp_path):
    for path, read_kw, python, cli in _python_and_cli(tmp_path):
        with pytest.raises(MaskValidationError) as info:
            read_mask(path, **read_kw)
        assert python in str(info.value), (path, str(info.value))
        assert cli in info.value.cli_message, (path, info.value.cli_message)
        assert info.value.cli_message.startswith(f"Mask file '{path}': ")
        for word in ("convention=", "format=", "dataset="):
            assert word not in info.value.cli_message, (path, info.value.cli_message)


def test_transposed_file_advice_in_both_languages(registry, tmp_path):
    path, read_kw, _ = _transposed(tmp_path)
    with pytest.raises(MaskValidationError) as info:
        register_from_file(registry, EIGER500K, "t", path, **read_kw)
    assert str(info.value).endswith("It is transposed: use mask.T.")
    assert info.value.cli_message.startswith(f"Mask file '{path}': The mask has shape 1030x514")
    assert info.value.cli_message.endswith(
        "It is transposed (rows and columns swapped): save the transposed array (mask.T in "
        "NumPy) and give that file."
    )
    assert registry.get_masks(include_retired=True) == []
