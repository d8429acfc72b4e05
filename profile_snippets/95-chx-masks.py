# 95-chx-masks.py: detector masks for every run of the CHX IPython profile.
#
# What it does (all in bluesky_callbacks.profile.install, which this file calls),
# once the base setup has created the RunEngine `RE`:
#   * opens the mask registry (as chx_masks.default_registry() would, and makes
#     it the default). A registry server that does not answer within
#     CHX_MASKS_START_TIMEOUT costs IPython start that much and one warning
#     line, never a broken profile.
#   * RE.preprocessors += chx_masks_provenance (MaskProvenance). At each run
#     start it chooses, per detector the run uses: the run's own
#     md={"mask_names": {...}} > the detector's active set in the registry >
#     CHX_MASKS_FALLBACK below, and records the exact masks in the start
#     document: "masks" (names, uids, versions, sha256, chosen_by), "mask_uids".
#   * RE.subscribe(chx_masks_router) (MaskingRouter): every raw run gets a
#     derived run with masked frames (its start has parent_uid = the raw uid)
#     written with TiledWriter to the "runs" store (see below), opened at the
#     first run so IPython starts fast. masked_run(raw_uid) finds it.
#   * helpers: masks_active(), masks_list(), masks_activate(), mask_show(),
#     mask_register(), masked_run(), chx_masks_registry(), chx_masks_runs().
#
# Where: copy it into profile_<name>/startup/ so that it sorts after the file
# that creates RE (e.g. 00-base.py). Needs chx-masks with the bluesky extra.
# Without RE it prints one line and sets up nothing.
#
# Configuration, from the environment at IPython start:
#   CHX_MASKS_URI (+ CHX_MASKS_API_KEY)  tiled server holding the registry, or
#   CHX_MASKS_PROFILE                    a tiled profile, else an embedded
#   CHX_MASKS_DIR                        registry in this directory (default
#                                        ~/.local/share/chx-masks);
#   CHX_MASKS_RUNS_URI (+ CHX_MASKS_RUNS_API_KEY)  tiled container for the
#       masked runs; default: a local store in <CHX_MASKS_DIR or
#       ~/.local/share/chx-masks>/runs.
#   CHX_MASKS_FRAMES_DIR  where the masked frames are written (HDF5 files,
#       bitshuffle-LZ4; the runs store holds references); default: inside a
#       local runs store. A runs server reads them only from its
#       readable_storage; without this variable it gets the frames inline.
# and the settings below.
#
# A registry server that is down: IPython start waits at most
# CHX_MASKS_START_TIMEOUT (2 s) and prints one warning line; tiled prints no
# "Retrying..." of its own. A run start waits for it at most CHX_MASKS_TIMEOUT
# once for the preprocessor and the router together; after a failure to answer,
# runs open at once (CHX_MASKS_ON_UNAVAILABLE decides how, one warning line per
# run) while a background check asks the registry again every few seconds
# (10 s at most); the first run after it answers has its masks again. Helpers
# fail at once with the time since it is down; chx_masks_registry(retry=True)
# asks it now.
#
# Changing the masks, no restart needed (applies from the next run start):
#   masks_activate("eiger4m_single_image", ["pixel_mask", "chip_mask", "beamstop"],
#                  note="sample B")
#   or from any shell:  chx-masks activate eiger4m_single_image pixel_mask chip_mask beamstop
#   one run only:  RE(count([eiger4m_single],
#                           md={"mask_names": {"eiger4m_single_image": ["beamstop_v2"]}}))
#   masks_active() shows what the next run will use, and flags any name that is
#   not a registered mask. Metadata given to RE(...) itself, e.g.
#   RE(plan, mask_names=...), reaches the run after the masks were chosen: it
#   cannot choose them, and the run says so in one warning line.

# Masks of detectors that have no active set in the registry. The registry's
# active sets decide for the others; this is read once, at IPython start.
CHX_MASKS_FALLBACK = {
    "eiger4m_single_image": ["pixel_mask", "chip_mask", "bad_pixels"],
    "eiger1m_single_image": ["chip_mask"],
    "eiger500K_single_image": ["chip_mask"],
}

# When the registry cannot be reached (or a mask is missing) at a run start:
#   "record": open the run anyway and record why its masks are missing, in
#             masks[<detector>]["error"]; its masked run then withholds that
#             detector's frames and ends with exit_status "fail".
#   "raise":  refuse to open the run, with an error naming registry and masks.
# "record" so that a registry outage never stops beam time.
CHX_MASKS_ON_UNAVAILABLE = "record"

# Seconds a run start waits for the registry: once, for the preprocessor and
# the router together. After the registry failed to answer, runs do not wait
# for it until a background check sees it answer again.
CHX_MASKS_TIMEOUT = 20.0

# Seconds IPython start waits for a registry server (CHX_MASKS_URI or
# CHX_MASKS_PROFILE) to answer; an embedded registry is opened at start anyway.
CHX_MASKS_START_TIMEOUT = 2.0


def _chx_masks_install(RE):
    """Wire masks into ``RE`` (bluesky_callbacks.profile.install); never raise."""
    import sys

    try:
        from bluesky_callbacks.profile import install

        return install(
            RE,
            fallback=CHX_MASKS_FALLBACK,
            on_unavailable=CHX_MASKS_ON_UNAVAILABLE,
            timeout=CHX_MASKS_TIMEOUT,
            start_timeout=CHX_MASKS_START_TIMEOUT,
            previous=globals().get("_chx_masks_profile"),  # run again: replace the wiring
        )
    except Exception as err:
        print(
            f"chx-masks: masks are NOT set up ({type(err).__name__}: {err}); the rest of "
            "the profile is unaffected.",
            file=sys.stderr,
        )
        return None


if "RE" in globals():
    _chx_masks_profile = _chx_masks_install(RE)  # noqa: F821
    if _chx_masks_profile is not None:
        # masks_active(), masks_list(), masks_activate(), mask_show(), mask_register(),
        # masked_run(), chx_masks_registry(), chx_masks_runs(), and the two callbacks.
        globals().update(_chx_masks_profile.helpers())
else:
    print(
        "chx-masks: RE is not defined, so masks are not set up: 95-chx-masks.py must "
        "run after the startup file that creates the RunEngine RE."
    )
    del CHX_MASKS_FALLBACK, CHX_MASKS_ON_UNAVAILABLE, CHX_MASKS_TIMEOUT, CHX_MASKS_START_TIMEOUT
    del _chx_masks_install
