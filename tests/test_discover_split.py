import shutil

import pytest
from PIL import Image

from cxrlab.discover import discover
from cxrlab.errors import DataError
from cxrlab.split import Manifest, group_key, split_samples


def _img(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), value).save(path)


def test_discover_class_folders_ignores_hidden(tmp_path):
    for i in range(3):
        _img(tmp_path / "abnormal" / f"a{i}.png")
        _img(tmp_path / "normal" / "sub" / f"n{i}.jpg")
    _img(tmp_path / "normal" / ".hidden.png")
    _img(tmp_path / ".git" / "x.png")
    (tmp_path / "normal" / "notes.txt").write_text("hi")
    ds = discover(tmp_path)
    assert ds.labels == ["abnormal", "normal"]
    assert ds.counts() == {"abnormal": 3, "normal": 3}
    assert "normal/sub/n0.jpg" in {s.relpath for s in ds.samples}
    assert any("only 3 image" in w for w in ds.warnings)


def test_discover_needs_two_classes(tmp_path):
    _img(tmp_path / "normal" / "a.png")
    with pytest.raises(DataError, match=r"found 1 class.*normal/.*at least 2"):
        discover(tmp_path)


def test_label_from_name_nlm_rule(tmp_path):
    for name in ["CHNCXR_0001_0.png", "CHNCXR_0002_1.png", "MCUCXR_0003_1.png", "README.png"]:
        _img(tmp_path / "CXR_png" / name)
    ds = discover(tmp_path, label_from_name="nlm")
    assert {(s.relpath.split("/")[-1], s.label) for s in ds.samples} == {
        ("CHNCXR_0001_0.png", "normal"), ("CHNCXR_0002_1.png", "abnormal"), ("MCUCXR_0003_1.png", "abnormal")}
    assert any("did not match" in w for w in ds.warnings)
    with pytest.raises(DataError, match="no group"):
        discover(tmp_path, label_from_name=r"_\d\.png$")


def _samples(root):
    return discover(root, min_per_class=0).samples


def test_split_is_stable_when_folder_moves_and_grows(tmp_path):
    src = tmp_path / "lungs"
    for i in range(60):
        _img(src / ("abnormal" if i % 2 else "normal") / f"img{i}.png")
    first, _ = split_samples(_samples(src))
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(src, moved)
    assert split_samples(_samples(moved))[0].to_csv() == first.to_csv()
    for i in range(60, 90):
        _img(moved / "normal" / f"img{i}.png")
    grown = {e.relpath: e.split for e in split_samples(_samples(moved))[0].entries}
    assert all(grown[e.relpath] == e.split for e in first.entries)
    assert set(first.counts()) == {"train", "validation", "test"} and first.counts()["train"] > 30


def test_nohash_and_group_regex_keep_groups_together(tmp_path):
    assert group_key("a/p1_nohash_0.jpg") == group_key("a/p1_nohash_7.jpg") == "a/p1"
    for pid in range(40):
        for k in range(3):
            _img(tmp_path / ("abnormal" if k == 0 else "normal") / f"pat{pid}_view{k}.png")
    manifest, _ = split_samples(_samples(tmp_path), group_regex=r"pat(?P<group>\d+)_")
    by_patient = {}
    for e in manifest.entries:
        by_patient.setdefault(e.group, set()).add(e.split)
    assert len(by_patient) == 40 and all(len(s) == 1 for s in by_patient.values())


def test_manifest_round_trip_and_reuse(tmp_path):
    for i in range(30):
        _img(tmp_path / "data" / ("abnormal" if i % 2 else "normal") / f"x{i}.png")
    samples = _samples(tmp_path / "data")
    manifest, _ = split_samples(samples)
    manifest.write(tmp_path / "split.csv")
    again = Manifest.read(tmp_path / "split.csv")
    assert again.digest() == manifest.digest()
    # Reusing the file keeps every split, even with other percentages.
    reused, notes = split_samples(samples, testing_percentage=50, previous=again)
    assert reused.digest() == manifest.digest() and notes == []
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a cxrlab split file"):
        Manifest.read(tmp_path / "bad.csv")
