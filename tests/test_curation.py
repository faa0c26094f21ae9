"""Curated label sets (atlas.curation): storage, versions, atomicity, concurrency, bad
input; ``tme-atlas analyse|crosstalk DIR --labels NAME``."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest
from app_fixtures import browser  # noqa: F401 - fixture

from atlas import curation as A
from atlas import schema
from atlas.errors import CurationConflict, InvalidName, UnknownValue


def _base(n=12):
    labels = ["T"] * 4 + ["B"] * 4 + ["NK"] * 4
    return pd.Series(labels[:n], index=[f"c{i}" for i in range(n)])


def test_versions_who_when_what_and_the_atlas_untouched(tmp_path):
    atlas_file = tmp_path / schema.ATLAS_FILE
    atlas_file.write_bytes(b"atlas")
    e1 = A.edit_labels(
        tmp_path, "lab", {"op": "rename", "from": "T", "to": "T cell"}, user="alice",
        base_labels=_base, expected_version=0,
    )  # fmt: skip
    assert e1["version"] == 1 and e1["user"] == "alice" and e1["n_changed"] == 4
    e2 = A.edit_labels(
        tmp_path, "lab", {"op": "merge", "from": ["B", "NK"], "to": "Lymph"}, user="bob",
        expected_version=1,
    )  # fmt: skip
    assert e2["parent"] == 1 and e2["op"] == {"op": "merge", "from": ["B", "NK"], "to": "Lymph"}
    e3 = A.edit_labels(
        tmp_path, "lab", {"op": "relabel", "cells": ["c0", "c11"], "to": "Odd"}, user="bob"
    )
    assert e3["op"]["from_counts"] == {"T cell": 1, "Lymph": 1} and e3["n_changed"] == 2
    assert A.label_sets(tmp_path) == ["lab"] and A.latest_version(tmp_path, "lab") == 3
    # every version stays readable; a new reader (another process) sees the same
    v1, v3 = A.read_labels(tmp_path, "lab", 1), A.read_labels(tmp_path, "lab")
    assert list(v1) == ["T cell"] * 4 + ["B"] * 4 + ["NK"] * 4
    assert list(v3) == ["Odd"] + ["T cell"] * 3 + ["Lymph"] * 7 + ["Odd"]
    man = json.loads((tmp_path / "annotations" / "lab" / "manifest.json").read_text())
    assert [v["user"] for v in man["versions"]] == ["alice", "bob", "bob"]
    assert all(v["time"].endswith("+00:00") for v in man["versions"])
    assert man["base"]["n_cells"] == 12
    assert atlas_file.read_bytes() == b"atlas"  # never rewritten
    # aligned to another cell order; other cells -> one clear error
    ids = list(reversed(v3.index))
    assert list(A.aligned_labels(tmp_path, "lab", 3, ids)) == list(v3[ids])
    with pytest.raises(Exception, match="another build"):
        A.aligned_labels(tmp_path, "lab", 3, ids + ["zz"])


def test_conflicting_edit_is_refused_and_writes_nothing(tmp_path):
    A.edit_labels(tmp_path, "s", {"op": "rename", "from": "T", "to": "X"}, user="a",
                  base_labels=_base(), expected_version=0)  # fmt: skip
    A.edit_labels(tmp_path, "s", {"op": "rename", "from": "B", "to": "Y"}, user="b",
                  expected_version=1)  # fmt: skip
    before = sorted(p.name for p in (tmp_path / "annotations" / "s").iterdir())
    with pytest.raises(CurationConflict, match="version 2, not 1"):
        A.edit_labels(tmp_path, "s", {"op": "rename", "from": "NK", "to": "Z"}, user="a",
                      expected_version=1)  # fmt: skip
    with pytest.raises(CurationConflict):  # a "new" set that exists
        A.edit_labels(tmp_path, "s", {"op": "rename", "from": "NK", "to": "Z"}, user="a",
                      base_labels=_base(), expected_version=0)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "annotations" / "s").iterdir()) == before
    assert A.latest_version(tmp_path, "s") == 2


def test_concurrent_editors_do_not_lose_edits(tmp_path):
    """Eight threads save at once (no version check): the lock serialises them, every
    edit lands as its own version on top of the previous one."""
    base = pd.Series([f"t{i}" for i in range(8)] * 3, index=[f"c{i}" for i in range(24)])
    A.edit_labels(tmp_path, "s", {"op": "relabel", "cells": ["c0"], "to": "start"}, user="a",
                  base_labels=base)  # fmt: skip
    errors = []

    def edit(i):
        try:
            A.edit_labels(tmp_path, "s", {"op": "rename", "from": f"t{i}", "to": f"u{i}"},
                          user=f"user{i}")  # fmt: skip
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert A.latest_version(tmp_path, "s") == 9
    final = set(A.read_labels(tmp_path, "s"))
    assert final == {"start"} | {f"u{i}" for i in range(8)}


def test_a_failed_write_leaves_the_last_version(tmp_path, monkeypatch):
    A.edit_labels(tmp_path, "s", {"op": "rename", "from": "T", "to": "X"}, user="a",
                  base_labels=_base())  # fmt: skip

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(A, "atomic_write_text", boom)  # the manifest (commit) fails
    with pytest.raises(OSError):
        A.edit_labels(tmp_path, "s", {"op": "rename", "from": "B", "to": "Y"}, user="a")
    monkeypatch.undo()
    assert A.latest_version(tmp_path, "s") == 1
    assert set(A.read_labels(tmp_path, "s")) == {"X", "B", "NK"}
    leftovers = [p.name for p in (tmp_path / "annotations" / "s").iterdir() if "tmp" in p.name]
    assert leftovers == []
    # the next edit reuses version 2 (the orphan file is overwritten)
    assert (
        A.edit_labels(tmp_path, "s", {"op": "rename", "from": "B", "to": "Y"}, user="a")["version"]
        == 2
    )


@pytest.mark.parametrize(
    "op, match",
    [
        ({"op": "rename", "from": "T", "to": "=cmd|' /C calc'!A0"}, "formula"),
        ({"op": "rename", "from": "T", "to": "+SUM(A1)"}, "formula"),
        ({"op": "rename", "from": "T", "to": "@x"}, "formula"),
        ({"op": "rename", "from": "T", "to": "-2+3"}, "formula"),
        ({"op": "rename", "from": "T", "to": "a\nforged log line"}, "control"),
        ({"op": "rename", "from": "T", "to": "x" * 61}, "too long"),
        ({"op": "rename", "from": "T", "to": "   "}, "empty"),
        ({"op": "rename", "from": "T", "to": 5}, "text"),
        ({"op": "rename", "from": "T", "to": "B"}, "merge"),
        ({"op": "rename", "from": "nope", "to": "X"}, "unknown label"),
        ({"op": "merge", "from": ["T"], "to": "X"}, "two"),
        ({"op": "merge", "from": ["T", "nope"], "to": "X"}, "unknown label"),
        ({"op": "relabel", "cells": [], "to": "X"}, "select"),
        ({"op": "relabel", "cells": ["c0", "zz"], "to": "X"}, "unknown cell"),
        ({"op": "relabel", "cells": ["c0"], "to": "T"}, "no cell"),
        ({"op": "delete", "from": "T", "to": "X"}, "unknown edit"),
        ("rename", "mapping"),
    ],
)
def test_bad_edits_are_refused(op, match):
    with pytest.raises((InvalidName, UnknownValue), match=match):
        A.apply_operation(_base(), op)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 41, "a b", "=x", None, 3])
def test_bad_set_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidName):
        A.edit_labels(tmp_path, name, {"op": "rename", "from": "T", "to": "X"}, user="a",
                      base_labels=_base())  # fmt: skip
    assert not (tmp_path / "annotations").exists() or not any((tmp_path / "annotations").iterdir())


def test_unknown_set_or_version(tmp_path):
    with pytest.raises(UnknownValue):
        A.read_labels(tmp_path, "none")
    A.edit_labels(tmp_path, "s", {"op": "rename", "from": "T", "to": "X"}, user="a",
                  base_labels=_base())  # fmt: skip
    for bad in (0, 2, "1; rm", -1, True, 1.5):
        with pytest.raises(UnknownValue):
            A.read_labels(tmp_path, "s", bad)
    with pytest.raises(schema.MissingKeyError, match="tme-atlas analyse DIR --labels s"):
        A.read_table(tmp_path, "s", 1, schema.TABLE_COMPOSITION)
    with pytest.raises(schema.MissingKeyError, match="tme-atlas crosstalk DIR --labels s"):
        A.read_table(tmp_path, "s", 1, schema.TABLE_INTERACTIONS)


# ----------------------------------------------------------------------------- command line
@pytest.fixture
def synthetic_atlas(tmp_path):
    from atlas.testing import make_synthetic_atlas

    return make_synthetic_atlas(tmp_path / "atlas", n_cells=1500, n_genes=300, seed=3)


@pytest.mark.slow
def test_analyse_with_curated_labels_changes_the_composition_table(synthetic_atlas, capsys):
    """Merging two cell types, then ``tme-atlas analyse DIR --labels NAME``: the merged type
    appears in the composition table, the two old ones vanish; the atlas and its own
    tables are untouched; the version is recorded; a second merge needs a re-run."""
    import atlas
    from tme_atlas.cli import main

    d = synthetic_atlas
    with atlas.open(d) as store:
        obs = store.obs([schema.OBS_CELL_TYPE])
        ids = np.asarray(store.obs_names, dtype=str)
        orig = store.table(schema.TABLE_COMPOSITION)
    counts = obs[schema.OBS_CELL_TYPE].astype(str).value_counts()
    tested = set(orig[schema.COL_CELL_TYPE].astype(str))
    tme = [t for t in counts.index if t in tested and not t.startswith(schema.CLL_LABEL_PREFIX)]
    a, b = tme[:2]  # the two largest microenvironment types
    stamp = (
        (d / schema.ATLAS_FILE).stat().st_mtime_ns,
        (d / "tables" / "composition.csv").read_text(),
    )
    base = pd.Series(obs[schema.OBS_CELL_TYPE].astype(str).to_numpy(), index=ids)
    A.edit_labels(d, "merged", {"op": "merge", "from": [a, b], "to": "Merged cells"}, user="alice",
                  base_labels=base, expected_version=0)  # fmt: skip

    assert main(["analyse", str(d), "--labels", "merged"]) == 0
    comp = A.read_table(d, "merged", 1, schema.TABLE_COMPOSITION)
    types = set(comp[schema.COL_CELL_TYPE].astype(str))
    assert "Merged cells" in types and a not in types and b not in types
    assert types - {"Merged cells", schema.MALIGNANT_ROW} <= tested
    props = A.read_table(d, "merged", 1, schema.TABLE_PROPORTIONS)
    assert "Merged cells" in set(props[schema.COL_CELL_TYPE].astype(str))
    csv = (A.tables_dir(d, "merged", 1) / "composition.csv").read_text()
    assert "Merged cells" in csv
    params = A.read_params(d, "merged", 1)
    assert params["labels"] == "merged" and params["analyses"]["label_version"] == 1
    # the atlas and its own tables are untouched
    assert (
        (d / schema.ATLAS_FILE).stat().st_mtime_ns,
        (d / "tables" / "composition.csv").read_text(),
    ) == stamp  # noqa: E501
    # unknown set: one line, exit 2, nothing written
    capsys.readouterr()
    assert main(["analyse", str(d), "--labels", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label set 'nope'" in err
    # the explorer's pages of that version read the new tables
    from app.factory import create_app
    from atlas.config import load_config

    app = create_app(d, load_config(env={}))
    client = app.server.test_client()
    page = _cells_page(client, {}, "merged@1", url="/").get_data(as_text=True)
    assert "Merged cells" in page and "could not be shown" not in page
    # crosstalk with the version (cheap settings): the merged type sends and receives
    cfg = d.parent / "cheap.yaml"
    cfg.write_text("crosstalk: {n_perms: 0, by_sample: false, ligrec_check: false}\n")
    assert main(["crosstalk", str(d), "--labels", "merged", "--config", str(cfg)]) == 0
    inter = A.read_table(d, "merged", 1, schema.TABLE_INTERACTIONS)
    cells_ = set(inter[schema.COL_SOURCE].astype(str)) | set(inter[schema.COL_TARGET].astype(str))
    assert "Merged cells" in cells_ and a not in cells_ and b not in cells_
    assert A.read_params(d, "merged", 1)["crosstalk"]["label_version"] == 1
    assert (d / schema.ATLAS_FILE).stat().st_mtime_ns == stamp[0]
    # crosstalk of a version that was not analysed: names the command to run
    A.edit_labels(d, "merged", {"op": "rename", "from": "Merged cells", "to": "M2"}, user="bob")
    page = _cells_page(client, {}, "merged@2", url="/").get_data(as_text=True)
    assert "tme-atlas analyse DIR --labels merged" in page
    # who changed what, when, and which versions have their tables
    capsys.readouterr()
    assert main(["labels", str(d)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("merged\tv1\t") and "\talice\t" in lines[0]
    assert "merge" in lines[0] and lines[0].endswith("tables: analyse, crosstalk")
    assert "\tbob\t" in lines[1] and lines[1].endswith("tables: -")
    assert main(["labels", str(d), "--set", "../x"]) == 2
    # an older version by number: its page names it, an unknown one is one line
    page = _cells_page(client, {}, "merged@1", url="/interactions").get_data(as_text=True)
    assert "could not be shown" not in page
    A.edit_labels(d, "merged", {"op": "rename", "from": "M2", "to": "M3"}, user="bob")
    page = _cells_page(client, {}, "merged@2", url="/").get_data(as_text=True)
    assert "tme-atlas analyse DIR --labels merged@2" in page
    assert main(["analyse", str(d), "--labels", "merged@7"]) == 2
    assert "unknown version" in capsys.readouterr().err
    assert A.parse_labels_arg("merged@2") == ("merged", 2)
    for bad in ("merged@x", "../a@1", "merged@1@2"):
        with pytest.raises(InvalidName):
            A.parse_labels_arg(bad)
    assert main(["crosstalk", str(d), "--labels", "merged"]) == 2
    assert "tme-atlas analyse DIR --labels merged" in capsys.readouterr().err


# ----------------------------------------------------------------------------- explorer
_HASHES: dict[str, str] = {}


def _auth_config(**auth):
    from app.security import hash_password
    from atlas.config import load_config

    for user in ("alice", "bob"):
        _HASHES.setdefault(user, hash_password(f"pw-{user}"))
    section = {"enabled": True, "users": dict(_HASHES), "editors": ["alice"], **auth}
    return load_config(env={}, overrides={"auth": section})


def _basic(user: str) -> dict:
    import base64

    token = base64.b64encode(f"{user}:pw-{user}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def app_atlas_module(tmp_path_factory):
    from atlas.testing import make_synthetic_atlas

    return make_synthetic_atlas(
        tmp_path_factory.mktemp("curation_app") / "atlas", n_cells=800, n_genes=200, seed=4
    )


@pytest.fixture
def app_atlas(app_atlas_module, tmp_path):
    import shutil

    dst = tmp_path / "atlas"
    shutil.copytree(app_atlas_module, dst)
    return dst


def _callback(client, headers, needle: str, values: dict, cookie: str | None = None):
    """POST the callback whose output names ``needle`` with ``values`` by component id."""
    deps = client.get("/_dash-dependencies", headers=headers).get_json()
    cb = next(d for d in deps if needle in d["output"])
    parts = cb["output"][2:-2].split("...") if cb["output"].startswith("..") else [cb["output"]]
    outs = [p.rpartition(".")[::2] for p in parts]

    def deps_of(kind):
        return [
            {"id": d["id"], "property": d["property"], "value": values.get(d["id"])}
            for d in cb.get(kind, [])
        ]

    body = {
        "output": cb["output"],
        "outputs": [{"id": i, "property": p} for i, p in outs]
        if len(outs) > 1
        else {"id": outs[0][0], "property": outs[0][1]},
        "inputs": deps_of("inputs"),
        "changedPropIds": [f"{cb['inputs'][0]['id']}.{cb['inputs'][0]['property']}"],
        "state": deps_of("state"),
    }
    if cookie is not None:
        client.set_cookie("tme_labels", cookie)
    return client.post("/_dash-update-component", json=body, headers=headers)


def _edit(client, headers, **values):
    base = {"cur-apply": 1, "cur-op": "rename", "cur-set": "curated"}
    return _callback(client, headers, "labels-msg.children", {**base, **values})


def _cells_page(client, headers, labels: str, url: str = "/cells"):
    r = _callback(client, headers, "page.children", {"url": url, "labels-select": labels})
    assert r.status_code == 200, r.status_code
    return r


def test_editor_rename_persists_and_other_users_see_it(app_atlas):
    """alice (editor) renames a type in the explorer; bob (not an editor) cannot write
    (403, nothing saved) but sees the new version; both survive a restart (a second app
    on the same folder); the pages of the version read its recomputed tables."""
    from app.factory import create_app
    from atlas.errors import CurationRefused

    cfg = _auth_config()
    app1 = create_app(app_atlas, cfg)
    alice, bob = app1.server.test_client(), app1.server.test_client()
    old = app1.tme.base_view.cell_types[0]
    # the panel is rendered for editors only
    assert "cur-apply" in _cells_page(alice, _basic("alice"), "atlas").get_data(as_text=True)
    assert "cur-apply" not in _cells_page(bob, _basic("bob"), "atlas").get_data(as_text=True)

    r = _edit(alice, _basic("alice"), **{"cur-from": [old], "cur-to": "Renamed type"})
    assert r.status_code == 200
    out = r.get_json()["response"]
    assert out["labels-select"]["value"] == "curated@1"
    assert any(o["value"] == "curated@1" for o in out["labels-select"]["options"])
    entry = A.versions(app_atlas, "curated")[-1]
    assert entry["user"] == "alice" and entry["op"]["from"] == old

    # a non-editor's write is refused on the server, not only hidden
    r = _edit(bob, _basic("bob"), **{"cur-from": ["Renamed type"], "cur-to": "Bob's"})
    assert r.status_code == 403 and CurationRefused.__name__ not in r.get_data(as_text=True)
    r = _edit(bob, _basic("bob"), **{"cur-set": "bobs", "cur-from": [old], "cur-to": "Bob's"})
    assert r.status_code == 403
    assert A.label_sets(app_atlas) == ["curated"] and A.latest_version(app_atlas, "curated") == 1

    # restart: a new app on the same folder lists the version; bob switches to it
    app2 = create_app(app_atlas, cfg)
    bob2 = app2.server.test_client()
    layout = bob2.get("/_dash-layout", headers=_basic("bob")).get_data(as_text=True)
    assert "curated@1" in layout and "alice" in layout
    r = _cells_page(bob2, _basic("bob"), "curated@1")
    assert "tme_labels=curated@1" in r.headers.get("Set-Cookie", "")
    assert "HttpOnly" in r.headers["Set-Cookie"] and "SameSite=Strict" in r.headers["Set-Cookie"]
    with app2.server.test_request_context("/", headers={"Cookie": "tme_labels=curated@1"}):
        view = app2.tme.view
        assert view.label_set == "curated" and "Renamed type" in view.cell_types
        assert old not in view.cell_types
        assert not view.has_table(schema.TABLE_COMPOSITION)  # not recomputed yet
        assert view.has_table(schema.TABLE_QC_SUMMARY) == app2.tme.base_view.has_table(
            schema.TABLE_QC_SUMMARY
        )
    # tables recomputed for the version are the ones its pages read
    comp = pd.DataFrame({schema.COL_CELL_TYPE: ["Renamed type"], schema.COL_PADJ: [0.5]})
    A.write_tables(app_atlas, "curated", 1, {schema.TABLE_COMPOSITION: comp}, step="t", params={})
    with app2.server.test_request_context("/", headers={"Cookie": "tme_labels=curated@1"}):
        got = app2.tme.view.table(schema.TABLE_COMPOSITION)
        assert list(got[schema.COL_CELL_TYPE]) == ["Renamed type"]
    # a forged or stale cookie: the atlas's own labels, no error
    for bad in ("curated@9", "../../etc@1", "x" * 100, "curated@1x", "curated@"):
        with app2.server.test_request_context("/", headers={"Cookie": f"tme_labels={bad}"}):
            assert app2.tme.view.label_set is None


def test_edits_continue_the_viewed_version_and_conflicts_are_messages(app_atlas):
    from app.factory import create_app

    app = create_app(app_atlas, _auth_config())
    c, h = app.server.test_client(), _basic("alice")
    types = app.tme.base_view.cell_types
    assert _edit(c, h, **{"cur-from": [types[0]], "cur-to": "A1"}).status_code == 200
    # editing while viewing v1: merge on top of it -> v2
    c.set_cookie("tme_labels", "curated@1")
    r = _edit(c, h, **{"cur-op": "merge", "cur-from": ["A1", types[1]], "cur-to": "A12"})
    assert r.get_json()["response"]["labels-select"]["value"] == "curated@2"
    assert "A12" in set(A.read_labels(app_atlas, "curated", 2))
    # still viewing v1 (stale): refused with a message, nothing written
    r = _edit(c, h, **{"cur-from": [types[2]], "cur-to": "Late"})
    assert r.status_code == 200 and "version 2, not 1" in r.get_data(as_text=True)
    assert A.latest_version(app_atlas, "curated") == 2
    # hostile labels: a message, nothing written
    c.set_cookie("tme_labels", "curated@2")
    for bad in ('=HYPERLINK("http://x")', "a\nb", "x" * 200):
        r = _edit(c, h, **{"cur-from": [types[2]], "cur-to": bad})
        assert r.status_code == 200 and "msg-warn" in r.get_data(as_text=True)
    assert A.latest_version(app_atlas, "curated") == 2
    # relabel a lasso selection (box over the whole embedding)
    view = app.tme.base_view
    xy = view.umap
    box = {"range": {"x": [float(xy[:, 0].min()) - 1, float(xy[:, 0].max()) + 1],
                     "y": [float(xy[:, 1].min()) - 1, float(xy[:, 1].max()) + 1]}}  # fmt: skip
    r = _edit(c, h, **{"cur-op": "relabel", "cur-to": "All", "cells-umap": box})
    assert r.get_json()["response"]["labels-select"]["value"] == "curated@3"
    assert set(A.read_labels(app_atlas, "curated", 3)) == {"All"}


def test_curation_without_auth_is_off_unless_configured(app_atlas):
    from app.factory import create_app
    from atlas.config import load_config

    app = create_app(app_atlas, load_config(env={}))
    c = app.server.test_client()
    old = app.tme.base_view.cell_types[0]
    assert "cur-apply" not in _cells_page(c, {}, "atlas").get_data(as_text=True)
    assert _edit(c, {}, **{"cur-from": [old], "cur-to": "X"}).status_code == 403
    assert A.label_sets(app_atlas) == []
    app = create_app(
        app_atlas, load_config(env={}, overrides={"auth": {"curation_without_auth": True}})
    )  # noqa: E501
    c = app.server.test_client()
    assert _edit(c, {}, **{"cur-from": [old], "cur-to": "X"}).status_code == 200
    assert A.versions(app_atlas, "curated")[-1]["user"] == "local"


def test_editors_must_be_users(app_atlas):
    from app.factory import create_app

    with pytest.raises(ValueError, match="auth.editors: carol not in auth.users"):
        create_app(app_atlas, _auth_config(editors=["alice", "carol"]))


@pytest.mark.browser
def test_curation_in_the_browser(browser, app_atlas):  # noqa: F811 - fixture
    """In Chromium: rename a type in the panel; the message, the Labels menu and the UMAP
    legend show the new version, and a reload keeps it (the cookie)."""
    from app_fixtures import LiveServer
    from test_browser import choose, figure, idle, open_page, screenshot, severe_logs, wait_for

    from app.factory import create_app
    from atlas.config import load_config

    app = create_app(
        app_atlas, load_config(env={}, overrides={"auth": {"curation_without_auth": True}})
    )
    old = app.tme.base_view.cell_types[0]
    srv = LiveServer(app).start()
    try:
        browser.get_log("browser")
        open_page(browser, srv.url + "/cells")
        figure(browser, "cells-umap", until=lambda f: old in f["names"])
        idle(browser)
        choose(browser, "cur-from", old)
        browser.find_element("id", "cur-to").send_keys("Renamed type")
        browser.find_element("id", "cur-apply").click()
        wait_for(
            lambda: "Saved curated v1" in browser.find_element("id", "labels-msg").text,
            what="saved message",
        )
        figure(
            browser,
            "cells-umap",
            until=lambda f: "Renamed type" in f["names"] and old not in f["names"],
        )
        assert "curated v1" in browser.find_element("id", "labels-select").text
        idle(browser)
        screenshot(browser, "cells_curation")
        open_page(browser, srv.url + "/cells")  # a reload keeps the chosen version
        figure(browser, "cells-umap", until=lambda f: "Renamed type" in f["names"])
        assert "curated v1" in browser.find_element("id", "labels-select").text
        assert severe_logs(browser) == []
    finally:
        srv.stop()
