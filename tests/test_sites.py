"""Several sites (hospitals) in one run: discovery, the split within each site, per-site figures, leave-one-site-out."""

import csv
import json

import pytest

from conftest import make_dataset

from cxrlab.crossval import cross_validate, site_entries
from cxrlab.discover import discover_sites
from cxrlab.errors import DataError
from cxrlab.split import Manifest, split_samples


@pytest.fixture
def two_sites(tmp_path):
    return [make_dataset(tmp_path / "data" / "alpha", 24), make_dataset(tmp_path / "data" / "beta", 20, size=80)]


def test_each_folder_is_a_site_under_their_common_folder(two_sites):
    ds = discover_sites(two_sites)
    assert ds.root == two_sites[0].parent
    assert ds.sites == ["alpha", "beta"]
    assert ds.counts_by_site() == {"alpha": {"abnormal": 24, "normal": 24}, "beta": {"abnormal": 20, "normal": 20}}
    assert all((ds.root / s.relpath).is_file() and s.relpath.startswith(s.site + "/") for s in ds.samples)


def test_one_folder_is_discovered_as_before(two_sites):
    ds = discover_sites([two_sites[0]])
    assert ds.root == two_sites[0] and ds.sites == [""]
    assert {s.relpath.split("/")[0] for s in ds.samples} == {"abnormal", "normal"}


def test_a_csv_lists_images_with_their_sites(two_sites, tmp_path):
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "site"])
        for site in two_sites:
            for p in sorted(site.rglob("*.png")):
                w.writerow([p.relative_to(tmp_path).as_posix(), p.parent.name, "H-" + site.name])
        w.writerow(["data/gone.png", "normal", "H-alpha"])
    ds = discover_sites([listing])
    assert ds.sites == ["H-alpha", "H-beta"] and len(ds.samples) == 88
    assert any("not found" in w for w in ds.warnings)


def test_two_site_folders_with_the_same_name_are_refused(tmp_path):
    a, b = make_dataset(tmp_path / "x" / "lungs", 4), make_dataset(tmp_path / "y" / "lungs", 4)
    with pytest.raises(DataError, match="both named 'lungs'"):
        discover_sites([a, b])


def test_the_split_keeps_every_site_in_every_split_and_records_the_site(two_sites, tmp_path):
    ds = discover_sites(two_sites)
    manifest, _ = split_samples(ds.samples, validation_percentage=20, testing_percentage=20)
    for site in ds.sites:
        assert {e.split for e in manifest.entries if e.site == site} == {"train", "validation", "test"}
    manifest.write(tmp_path / "split.csv")
    assert Manifest.read(tmp_path / "split.csv").entries == sorted(manifest.entries, key=lambda e: e.relpath)


def test_a_split_file_without_a_site_column_still_reads(tmp_path):
    (tmp_path / "old.csv").write_text("relpath,label,group,split\na/1.png,a,a/1.png,train\n")
    assert Manifest.read(tmp_path / "old.csv").entries[0].site == ""


def test_leave_one_site_out_tests_each_site_on_the_others(two_sites):
    ds = discover_sites(two_sites)
    plans = list(site_entries(ds.samples))
    assert len(plans) == 2
    for entries in plans:
        test_sites = {e.site for e in entries if e.split == "test"}
        assert len(test_sites) == 1
        assert all(e.site not in test_sites for e in entries if e.split != "test")
        assert {e.split for e in entries if e.site not in test_sites} == {"train", "validation"}


def test_train_on_two_sites_reports_every_figure_per_site(two_sites, tiny_backbone, tmp_path):
    import cxrlab

    r = cxrlab.train(two_sites, output=tmp_path / "model", backbone=tiny_backbone, testing_percentage=30,
                     validation_percentage=20, bottleneck_dir=tmp_path / "bn")
    by_site = r.metrics["test_by_site"]
    assert set(by_site) == {"alpha", "beta"}
    assert sum(m["n"] for m in by_site.values()) == r.metrics["test"]["n"]
    assert all("auc" in m and "sensitivity" in m for m in by_site.values())
    info = json.loads((tmp_path / "model" / "cxrlab.json").read_text())
    assert info["training_data"]["sites"]["beta"] == {"abnormal": 20, "normal": 20}
    written = json.loads((r.run_dir / "metrics.json").read_text())
    assert set(written["test_by_site"]) == {"alpha", "beta"}
    header = (r.run_dir / "predictions.csv").read_text().splitlines()[0]
    assert header.endswith(",site")
    assert "Per site" in (r.run_dir / "report.html").read_text()
    assert {e.site for e in Manifest.read(r.run_dir / "split.csv").entries} == {"alpha", "beta"}


def test_cv_by_site_gives_one_row_per_held_out_site(two_sites, tiny_backbone, tmp_path):
    r = cross_validate(two_sites, backbone=tiny_backbone, by_site=True, bottleneck_dir=tmp_path / "bn")
    assert [row["site"] for row in r["folds"]] == ["alpha", "beta"]
    assert r["folds"][1]["n"] == 40


def test_cv_by_site_needs_two_sites(two_sites, tiny_backbone):
    with pytest.raises(DataError, match="at least two sites"):
        cross_validate(two_sites[0], backbone=tiny_backbone, by_site=True)


def test_cli_trains_on_two_site_folders(two_sites, tiny_backbone, tmp_path, capsys):
    from cxrlab.cli import main

    assert main(["train", *map(str, two_sites), "--output", str(tmp_path / "m"), "--backbone", tiny_backbone,
                 "--testing-percentage", "30", "--quiet"]) == 0
    assert "alpha" in capsys.readouterr().out
