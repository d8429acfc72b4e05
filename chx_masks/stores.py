"""tiled stores as chx-masks opens them, for the packages built on it.

The Bluesky integration keeps its run stores and products the way the
registry keeps masks: a local directory is a tiled SQLite catalog served in
the process (:func:`open_embedded`, by default under
:func:`default_directory`), a key written into a URI is taken out of it
(:func:`split_api_key`), writes name their author (:func:`local_user`), and
tiled's HTTP refusals are told apart by status (:func:`http_status`).

Examples
--------
>>> split_api_key("http://127.0.0.1:8000/runs?api_key=s3cret", None)
('http://127.0.0.1:8000/runs', 's3cret')
>>> "@" in local_user()
True
"""

from __future__ import annotations

from ._embedded import default_directory, open_embedded
from ._registry import _local_user as local_user
from ._registry import _split_api_key as split_api_key
from ._registry import _status as http_status

__all__ = ["default_directory", "http_status", "local_user", "open_embedded", "split_api_key"]
