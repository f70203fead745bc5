"""oni.data: the file loaders (good and bad files in every format), the parse cache, label
remapping, the real Location30 file, the paper's splits and the synthetic generator.

Every bad file must raise a DataError whose message names the file and the line.
"""
from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import time
import zipfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from oni import data
from oni.data import DataError

LOCATION30 = Path(__file__).resolve().parents[2] / "shared" / "data" / "location30" / \
    "dataset_location.tgz"


# ----------------------------------------------------------------------------- helpers

def _shokri_text(x, labels, quote=False, newline="\n") -> str:
    lines = []
    for row, label in zip(np.asarray(x).tolist(), labels):
        label = f'"{label}"' if quote else str(label)
        lines.append(",".join([label] + [f"{v:g}" for v in row]))
    return newline.join(lines) + newline


def _small(n=12, d=5, seed=0, labels=(3, 7, 12)):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, d)) < 0.3).astype(np.float32)
    y = np.array([labels[i % len(labels)] for i in range(n)])
    return x, y


def _write(path: Path, text) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _tar(path: Path, members: dict, mode="w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, content in members.items():
            blob = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


def _raises_at(path, line: int, fragment: str, load, *args, **kwargs):
    """``load`` must raise a DataError naming ``path``, ``line`` and ``fragment``."""
    with pytest.raises(DataError) as info:
        load(*args, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert f"line {line}" in message, message
    assert fragment in message, message
    return message


def _assert_same(a: data.Dataset, b: data.Dataset):
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.classes == b.classes


# ----------------------------------------------------------------------------- Shokri CSV

def test_shokri_csv_values_labels_and_mapping(tmp_path):
    x, y = _small()
    path = _write(tmp_path / "dataset_toy", _shokri_text(x, y))
    ds = data.load_shokri_csv(path, cache_dir=tmp_path / "cache")
    assert (ds.n, ds.d, ds.k, ds.name) == (12, 5, 3, "dataset_toy")
    assert ds.x.dtype == torch.float32 and ds.x.is_contiguous() and ds.y.dtype == torch.int64
    np.testing.assert_array_equal(ds.x.numpy(), x)
    assert ds.classes == (3, 7, 12)  # sorted original labels
    np.testing.assert_array_equal(np.asarray(ds.classes)[ds.y.numpy()], y)  # mapping kept


@pytest.mark.parametrize("variant", ["quoted", "crlf", "trailing-blank-lines", "no-final-newline",
                                     "spaces", "utf8-bom", "crcrlf"])
def test_shokri_csv_tolerated_layouts(tmp_path, variant):
    x, y = _small()
    plain = _shokri_text(x, y)
    text = {"quoted": _shokri_text(x, y, quote=True),
            "crlf": _shokri_text(x, y, newline="\r\n"),
            "trailing-blank-lines": plain + "\n\n  \n",
            "no-final-newline": plain.rstrip("\n"),
            "spaces": plain.replace(",", " , "),
            "utf8-bom": "\ufeff" + plain,
            # csv.writer's CRLF written through a Windows text-mode file
            "crcrlf": _shokri_text(x, y, newline="\r\r\n")}[variant]
    ds = data.load_shokri_csv(_write(tmp_path / "f", text), cache_dir=tmp_path / "c")
    ref = data.load_shokri_csv(_write(tmp_path / "g", plain), cache_dir=tmp_path / "c")
    _assert_same(ds, ref)


def test_shokri_csv_general_parser_matches_fast_path(tmp_path):
    """Single-digit fields take a fast path; other numbers the general float parser: both
    must give the same values, also with the two mixed across blocks."""
    x, y = _small(n=40, d=7)
    fast = data.load_shokri_csv(_write(tmp_path / "a", _shokri_text(x, y)), cache_dir=tmp_path)
    general_text = _shokri_text(x, y).replace(",0", ",0.0").replace(",1", ",1e0")
    general = data.load_shokri_csv(_write(tmp_path / "b", general_text), cache_dir=tmp_path)
    _assert_same(fast, general)
    # non-binary values survive exactly (float32)
    x2 = np.round(np.random.default_rng(1).normal(size=(9, 3)), 3).astype(np.float32)
    ds = data.load_shokri_csv(_write(tmp_path / "c", _shokri_text(x2, [1, 2, 3] * 3)),
                              cache_dir=tmp_path)
    np.testing.assert_array_equal(ds.x.numpy(), x2)


def test_shokri_csv_small_blocks_keep_line_numbers(tmp_path, monkeypatch):
    """Parsing in many small blocks gives the same data and the right line numbers."""
    x, y = _small(n=60, d=6)
    whole = data.load_shokri_csv(_write(tmp_path / "a", _shokri_text(x, y)), cache_dir=tmp_path)
    lines = _shokri_text(x, y).splitlines()
    lines[43] = lines[43].replace(",", ",x", 1)  # line 44 breaks
    bad = _write(tmp_path / "bad", "\n".join(lines) + "\n")
    monkeypatch.setattr(data, "_BLOCK_BYTES", 37)
    _assert_same(data.load_shokri_csv(_write(tmp_path / "b", _shokri_text(x, y)),
                                      cache_dir=tmp_path), whole)
    _raises_at(bad, 44, "'x0'", data.load_shokri_csv, bad, cache_dir=tmp_path)


GOOD = ["1,0,1,0", "2,1,1,0", "3,0,0,1", "1,1,0,1"]


def _with(line_no: int, replacement: str, lines=GOOD) -> str:
    out = list(lines)
    out[line_no - 1] = replacement
    return "\n".join(out) + "\n"


BAD_SHOKRI = {
    # name: (file text, line the message must name, a fragment it must contain)
    "empty file": ("", 1, "empty"),
    "only blank lines": ("\n\n  \n", 1, "empty"),
    "ragged row (extra field)": (_with(3, "3,0,0,1,1"), 3, "5 fields, expected 4"),
    "ragged row (short)": (_with(2, "2,1,1"), 2, "3 fields, expected 4"),
    "non-numeric field": (_with(2, "2,1,abc,0"), 2, "'abc'"),
    "missing label": (_with(4, ",1,0,1"), 4, "missing label"),
    "empty feature field": (_with(3, "3,0,,1"), 3, "empty field"),
    # numpy's parser reads a field of blanks as -1: they must not pass as features or labels
    "blank feature field": (_with(2, "2,1, ,0"), 2, "empty field: field 3"),
    "blank last field": (_with(3, "3,0,0,\t"), 3, "empty field: field 4"),
    "blank label": (_with(4, " ,1,0,1"), 4, "missing label"),
    "blank float feature": ("1,0.5,0\n2,0.25, \n", 2, "empty field: field 3"),
    "blank line inside": ("\n".join(GOOD[:2] + [""] + GOOD[2:]) + "\n", 3, "empty line"),
    "blank first line": ("\n" + "\n".join(GOOD) + "\n", 1, "empty line"),
    "whitespace line inside": ("\n".join(GOOD[:3] + ["  "] + GOOD[3:]) + "\n", 4,
                               "empty line"),
    "header line": ("label,f1,f2,f3\n" + "\n".join(GOOD) + "\n", 1, "header"),
    "not finite": (_with(2, "2,1,nan,0"), 2, "finite"),
    "beyond float32": (_with(2, "2,1,1e300,0"), 2, "field 3 is 1e+300, expected a finite number "
                                                   "within float32's range"),
    "label beyond int64": (_with(3, "1e300,0,0,1"), 3, "beyond the int64 range"),
    # float64 reads both as 2**53: they would merge into one class
    "labels beyond 2**53": ("1,0,1\n9007199254740993,1,0\n9007199254740992,0,0\n", 2,
                            "not below 2**53"),
    "fractional label": (_with(3, "0.5,0,0,1"), 3, "not a whole number"),
    "several fractional labels": ("0.5,0,1\n0.25,1,0\n1,0,0\n", 1,
                                  "2 of 3 labels are not whole numbers; the label column looks "
                                  "out of place"),
    "CR-only line endings": ("\r".join(GOOD) + "\r", 1, "CR-only line endings"),
    "lone carriage return": ("1,0,1\r\n2,1,0\r\n2,0\r,1\r\n", 3, "carriage return"),
    "labels in the last column": ("0,1,0,7\n1,0,1,3\n0,0,1,7\n", 1, "last"),
    "labels in the last column, later line": ("0,1,0,1\n1,0,1,0\n0,0,1,12\n", 3, "last"),
    "one class": ("5,0,1\n5,1,1\n", 1, "two classes"),
    "no features": ("1\n2\n", 1, "label followed by the features"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHOKRI))
def test_shokri_csv_bad_files_name_file_and_line(tmp_path, case):
    text, line, fragment = BAD_SHOKRI[case]
    path = _write(tmp_path / "dataset_bad", text)
    _raises_at(path, line, fragment, data.load_shokri_csv, path, cache_dir=tmp_path)


def test_shokri_csv_one_fractional_label_is_named_as_written(tmp_path):
    """A single stray label is shown unrounded (':g' printed 13.0000000001 as 13) and not
    blamed on the column layout, which only a column of fractional labels suggests."""
    path = _write(tmp_path / "dataset_bad", _with(2, "13.0000000001,1,1,0"))
    message = _raises_at(path, 2, "the label (field 1) is 13.0000000001, not a whole number",
                         data.load_shokri_csv, path, cache_dir=tmp_path)
    assert "out of place" not in message, message


def test_shokri_csv_member_only_for_archives(tmp_path):
    """member= on a plain file was ignored silently (the whole file was read)."""
    x, y = _small()
    path = _write(tmp_path / "plain.csv", _shokri_text(x, y))
    with pytest.raises(ValueError, match=r"member='zzz' .*plain\.csv is not a tar archive"):
        data.load_shokri_csv(path, member="zzz", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="member must be a str"):
        data.load_shokri_csv(_tar(tmp_path / "a.tgz", {"a": _shokri_text(x, y)}), member=1,
                             cache_dir=tmp_path)


def test_compressed_csv_that_is_not_a_tar_archive(tmp_path):
    """A gzip-compressed plain CSV was reported as a truncated or corrupt tar archive."""
    x, y = _small()
    path = _write(tmp_path / "dataset.csv.gz", gzip.compress(_shokri_text(x, y).encode()))
    for load in (data.load_shokri_csv, data.load_dataset, data.load_texas):
        message = _raises_at(path, 1, "gzip-compressed, but not a tar archive", load, path,
                             cache_dir=tmp_path)
        assert "truncated" not in message, message


def test_shokri_csv_in_archives(tmp_path):
    x, y = _small()
    text = _shokri_text(x, y, quote=True)
    plain = data.load_shokri_csv(_write(tmp_path / "bangkok", text), cache_dir=tmp_path)
    for mode, suffix in [("w:gz", ".tgz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz"),
                         ("w", ".tar")]:
        archive = _tar(tmp_path / f"dataset_location{suffix}", {"bangkok": text}, mode)
        ds = data.load_shokri_csv(archive, cache_dir=tmp_path / "c")
        _assert_same(ds, plain)
        assert ds.name == "dataset_location"
    # several files: the caller picks one
    two = _tar(tmp_path / "two.tgz", {"a": text, "b": "1,0\n2,1\n", "._a": "junk"})
    _raises_at(two, 1, "member=", data.load_shokri_csv, two, cache_dir=tmp_path)
    _assert_same(data.load_shokri_csv(two, member="a", cache_dir=tmp_path), plain)
    _raises_at(two, 1, "no member 'c'", data.load_shokri_csv, two, member="c",
               cache_dir=tmp_path)
    # a bad record inside an archive names archive, member and line
    bad = _tar(tmp_path / "bad.tgz", {"bangkok": _with(2, "2,1,zz,0")})
    message = _raises_at(bad, 2, "'zz'", data.load_shokri_csv, bad, cache_dir=tmp_path)
    assert "bangkok" in message


def test_truncated_and_corrupt_archives(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.random((3000, 40)) < 0.5).astype(int)  # incompressible enough to span blocks
    text = _shokri_text(x, rng.integers(1, 9, 3000))
    whole = _tar(tmp_path / "whole.tgz", {"bangkok": text}).read_bytes()
    truncated = _write(tmp_path / "truncated.tgz", whole[:len(whole) * 6 // 10])
    with pytest.raises(DataError) as info:
        data.load_shokri_csv(truncated, cache_dir=tmp_path)
    message = str(info.value)
    assert str(truncated) in message and "truncated" in message and "line " in message
    assert "bangkok" in message
    garbage = _write(tmp_path / "garbage.tgz", b"\x1f\x8b" + bytes(range(256)) * 4)
    _raises_at(garbage, 1, "not a readable tar archive", data.load_shokri_csv, garbage,
               cache_dir=tmp_path)
    cut_header = _write(tmp_path / "cut.tgz", whole[:30])
    with pytest.raises(DataError, match="cut.tgz"):
        data.load_shokri_csv(cut_header, cache_dir=tmp_path)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        data.load_shokri_csv(tmp_path / "nothing-here")
    _raises_at(tmp_path, 1, "directory", data.load_shokri_csv, tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # would block until a writer came, and could not be read twice
    for load in (data.load_dataset, data.load_shokri_csv, data.load_texas, data.load_npz):
        with pytest.raises(DataError, match="fifo: not a regular file or directory"):
            load(fifo)


# ----------------------------------------------------------------------------- cache

def _cache_files(directory: Path):
    return sorted(p for p in directory.iterdir() if p.name.endswith(".npz"))


def test_cache_second_load_skips_the_parser(tmp_path, monkeypatch):
    x, y = _small()
    (tmp_path / "src").mkdir()
    path = _write(tmp_path / "src" / "dataset_toy", _shokri_text(x, y))
    cache = tmp_path / "cache"
    first = data.load_shokri_csv(path, cache_dir=cache)
    files = _cache_files(cache)
    assert len(files) == 1 and files[0].name.startswith("dataset_toy.oni-")
    assert [p.name for p in cache.iterdir()] == [files[0].name]  # no temporary files left

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again although a valid cache exists")
    monkeypatch.setattr(data, "_parse_file", no_parsing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(data.load_shokri_csv(path, cache_dir=cache), first)
    assert first.name == "dataset_toy"


def test_cache_is_rebuilt_when_the_source_changes(tmp_path):
    x, y = _small()
    path = _write(tmp_path / "f", _shokri_text(x, y))
    first = data.load_shokri_csv(path, cache_dir=tmp_path / "c")
    x2 = 1 - x
    _write(path, _shokri_text(x2, y))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = data.load_shokri_csv(path, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(second.x.numpy(), x2)
    assert not torch.equal(first.x, second.x)


@pytest.mark.parametrize("how", ["rewritten", "renamed-over"])
def test_cache_misses_a_same_size_replacement_with_restored_mtime(tmp_path, how):
    """A replacement of the same size whose mtime was put back (os.utime, cp -p, rsync -t,
    coarse clocks) served the old file's data from the cache."""
    path = _write(tmp_path / "f.csv", "1,0,1\n2,1,0\n1,1,1\n")
    old = data.load_shokri_csv(path, cache_dir=tmp_path / "c")
    st = path.stat()
    time.sleep(0.05)  # past a coarse ctime clock tick (a jiffy on Linux)
    new_text = "2,0,1\n1,1,0\n2,1,1\n"  # same size, other labels
    target = path if how == "rewritten" else tmp_path / "g.csv"
    _write(target, new_text)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    if how == "renamed-over":
        os.replace(target, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    if (path.stat().st_ino, path.stat().st_ctime_ns) == (st.st_ino, st.st_ctime_ns):
        pytest.skip("this file system's change-time clock did not tick in 50 ms")
    new = data.load_shokri_csv(path, cache_dir=tmp_path / "c")
    assert old.y.tolist() == [0, 1, 0] and new.y.tolist() == [1, 0, 1]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped-byte", "rewritten-x",
                                    "other-key"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, damage):
    rng = np.random.default_rng(2)
    x = (rng.random((300, 50)) < 0.3).astype(np.float32)
    path = _write(tmp_path / "f", _shokri_text(x, rng.integers(0, 5, 300)))
    cache = tmp_path / "c"
    good = data.load_shokri_csv(path, cache_dir=cache)
    (cached,) = _cache_files(cache)
    blob = bytearray(cached.read_bytes())
    if damage == "garbage":
        blob = bytearray(b"not an npz at all")
    elif damage == "truncated":
        blob = blob[:len(blob) // 2]
    elif damage == "flipped-byte":
        start = blob.index(b"\x00\x01") if b"\x00\x01" in blob else len(blob) // 3
        blob[start] ^= 0x01  # inside x's data
    elif damage == "rewritten-x":  # a valid zip whose x no longer matches its checksum
        with np.load(cached) as npz:
            arrays = {key: npz[key] for key in npz.files}
        arrays["x"] = arrays["x"].copy()
        arrays["x"][0, 0] = 1 - arrays["x"][0, 0]
        out = io.BytesIO()
        np.savez(out, **arrays)
        blob = bytearray(out.getvalue())
    else:  # a valid file written for another source
        other = _write(tmp_path / "g", _shokri_text(x[:5], [0, 1, 2, 3, 4]))
        data.load_shokri_csv(other, cache_dir=tmp_path / "other")
        blob = bytearray(_cache_files(tmp_path / "other")[0].read_bytes())
    cached.write_bytes(bytes(blob))
    why = {"rewritten-x": "checksum mismatch", "other-key": "another source"}.get(damage, "")
    with pytest.warns(UserWarning, match=f"ignoring the cache file.*{why}"):
        again = data.load_shokri_csv(path, cache_dir=cache)
    _assert_same(again, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: trusted again
        _assert_same(data.load_shokri_csv(path, cache_dir=cache), good)


def test_default_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "oni"
    x, y = _small()
    writable = tmp_path / "writable"
    writable.mkdir()
    data.load_shokri_csv(_write(writable / "f", _shokri_text(x, y)))
    assert len(_cache_files(writable)) == 1  # beside the source
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    src = _write(readonly / "f", _shokri_text(x, y))
    readonly.chmod(0o555)
    try:
        ds = data.load_shokri_csv(src)
    finally:
        readonly.chmod(0o755)
    assert _cache_files(readonly) == []  # a read-only directory stays clean, even for root
    assert len(_cache_files(tmp_path / "xdg" / "oni")) == 1
    assert ds.n == 12


def test_uncacheable_location_warns_but_loads(tmp_path):
    x, y = _small()
    path = _write(tmp_path / "f", _shokri_text(x, y))
    not_a_dir = _write(tmp_path / "file", "x")
    with pytest.warns(UserWarning, match="could not cache"):
        ds = data.load_shokri_csv(path, cache_dir=not_a_dir)
    np.testing.assert_array_equal(ds.x.numpy(), x)


# ----------------------------------------------------------------------------- Texas100

def _texas_files(x, y):
    feats = "\n".join(",".join(str(int(v)) for v in row) for row in x) + "\n"
    labels = "\n".join(str(v) for v in y) + "\n"
    return feats, labels


def test_texas_directory_and_archive(tmp_path):
    x, y = _small(n=15, d=9, labels=(100, 4, 27))
    feats, labels = _texas_files(x, y)
    folder = tmp_path / "texas" / "100"
    folder.mkdir(parents=True)
    _write(folder / "feats", feats)
    _write(folder / "labels", labels)
    ds = data.load_texas(folder, cache_dir=tmp_path / "c")
    assert (ds.n, ds.d, ds.k, ds.name) == (15, 9, 3, "texas100")
    np.testing.assert_array_equal(ds.x.numpy(), x)
    assert ds.classes == (4, 27, 100)
    np.testing.assert_array_equal(np.asarray(ds.classes)[ds.y.numpy()], y)
    archive = _tar(tmp_path / "dataset_texas.tgz", {"texas/100/feats": feats,
                                                    "texas/100/labels": labels})
    from_archive = data.load_texas(archive, cache_dir=tmp_path / "c")
    _assert_same(from_archive, ds)
    assert from_archive.name == "dataset_texas"
    _assert_same(data.load_texas(archive, cache_dir=tmp_path / "c"), ds)  # from the cache


def test_texas_bad_files(tmp_path):
    x, y = _small(n=6, d=4)
    feats, labels = _texas_files(x, y)
    folder = tmp_path / "t"
    folder.mkdir()
    _write(folder / "feats", feats)
    _write(folder / "labels", "\n".join(labels.splitlines()[:5]) + "\n")
    _raises_at(folder / "labels", 6, "ends after 5 records", data.load_texas, folder,
               cache_dir=tmp_path / "c1")
    _write(folder / "labels", labels.replace("7\n", "7,1\n"))
    _raises_at(folder / "labels", 1, "fields", data.load_texas, folder, cache_dir=tmp_path / "c2")
    _write(folder / "labels", labels.replace("12\n", "12.5\n", 1))
    _raises_at(folder / "labels", 3, "not a whole number", data.load_texas, folder,
               cache_dir=tmp_path / "c3")
    _write(folder / "labels", labels)
    _write(folder / "feats", feats.replace("\n", ",0\n", 1))
    _raises_at(folder / "feats", 2, "ragged", data.load_texas, folder, cache_dir=tmp_path / "c4")
    # a first field past float32's range: it was read as a Shokri label would be (finite in
    # float64) and became inf in the features and the cache without a word
    lines = feats.splitlines(keepends=True)
    lines[2] = "1e39" + lines[2][lines[2].index(","):]
    _write(folder / "feats", "".join(lines))
    _raises_at(folder / "feats", 3, "field 1 is 1e+39, expected a finite number within "
               "float32's range", data.load_texas, folder, cache_dir=tmp_path / "c5")
    assert not list((tmp_path / "c5").glob("*.npz"))
    (folder / "labels").unlink()
    with pytest.raises(FileNotFoundError, match="labels"):
        data.load_texas(folder)
    archive = _tar(tmp_path / "t.tgz", {"texas/100/feats": feats})
    _raises_at(archive, 1, "'labels'", data.load_texas, archive)


# ----------------------------------------------------------------------------- npz, arrays

def test_npz_round_trip_and_raw_labels(tmp_path):
    x, y = _small()
    ds = data.from_arrays(x, y, name="toy")
    data.save_npz(ds, tmp_path / "toy.npz")
    _assert_same(data.load_npz(tmp_path / "toy.npz"), ds)
    assert data.load_npz(tmp_path / "toy.npz").name == "toy"
    np.savez(tmp_path / "raw.npz", x=x * 0.5, y=y)  # raw labels, non-integer features
    raw = data.load_npz(tmp_path / "raw.npz")
    assert raw.classes == (3, 7, 12) and raw.name == "raw"
    np.testing.assert_array_equal(raw.x.numpy(), x * 0.5)
    named = data.from_arrays(x, np.array(["b", "a", "c"] * 4))
    data.save_npz(named, tmp_path / "named.npz")
    assert data.load_npz(tmp_path / "named.npz").classes == ("a", "b", "c")
    # uint64 labels beyond int64 stay distinct (a float64 classes array merged them)
    huge = data.from_arrays(x, np.array([2 ** 63, 2 ** 63 + 1, 5] * 4, dtype=np.uint64))
    data.save_npz(huge, tmp_path / "huge.npz")
    assert data.load_npz(tmp_path / "huge.npz").classes == (5, 2 ** 63, 2 ** 63 + 1)
    _assert_same(data.load_npz(tmp_path / "huge.npz"), huge)


def test_npz_bad_files(tmp_path):
    x, y = _small()
    np.savez(tmp_path / "no_y.npz", x=x)
    with pytest.raises(DataError, match=r"no_y\.npz.*'y'"):
        data.load_npz(tmp_path / "no_y.npz")
    np.savez(tmp_path / "range.npz", x=x, y=np.arange(12), classes=np.array([1, 2]))
    with pytest.raises(DataError, match=r"range\.npz.*row 2 is 2"):
        data.load_npz(tmp_path / "range.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((3, 2), np.nan), y=np.arange(3))
    with pytest.raises(DataError, match=r"nan\.npz.*finite"):
        data.load_npz(tmp_path / "nan.npz")
    np.savez(tmp_path / "rows.npz", x=x, y=np.zeros(5, np.int64), classes=np.array([1, 2]))
    with pytest.raises(DataError, match=r"rows\.npz.*one class index per row"):
        data.load_npz(tmp_path / "rows.npz")
    # one class: no classification task (oni run would report a meaningless attack)
    np.savez(tmp_path / "one.npz", x=np.zeros((3, 2)), y=np.zeros(3, np.int64),
             classes=np.array([7]))
    with pytest.raises(DataError, match=r"one\.npz.*at least two classes"):
        data.load_npz(tmp_path / "one.npz")
    np.savez(tmp_path / "one_label.npz", x=np.zeros((3, 2)), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"one_label\.npz.*at least two classes"):
        data.load_npz(tmp_path / "one_label.npz")
    np.savez(tmp_path / "no_features.npz", x=np.zeros((3, 0)), y=np.arange(3))
    with pytest.raises(DataError, match=r"no_features\.npz.*no features"):
        data.load_npz(tmp_path / "no_features.npz")
    _write(tmp_path / "junk.npz", b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"junk\.npz.*not a readable"):
        data.load_npz(tmp_path / "junk.npz")


def test_save_npz_never_overwrites_other_files(tmp_path):
    """save_npz replaced whatever was at path (a user's notes, the source CSV); it now
    replaces only an earlier save (a data set .npz)."""
    x, y = _small()
    ds = data.from_arrays(x, y, name="toy")
    csv = _write(tmp_path / "toy.csv", _shokri_text(x, y))
    notes = _write(tmp_path / "notes.txt", "precious")
    np.save(tmp_path / "arr.npy", x)
    for victim in (csv, notes, tmp_path / "arr.npy"):
        before = victim.read_bytes()
        with pytest.raises(FileExistsError, match=rf"refusing to overwrite "
                           rf"{re.escape(str(victim))}: it is not a data set \.npz"):
            data.save_npz(ds, victim)
        assert victim.read_bytes() == before
    # an earlier save, or any .npz load_npz reads, is replaced
    data.save_npz(ds, tmp_path / "toy.npz")
    other = data.from_arrays(x, y[::-1].copy(), name="other")
    data.save_npz(other, tmp_path / "toy.npz")
    _assert_same(data.load_npz(tmp_path / "toy.npz"), other)
    np.savez(tmp_path / "raw.npz", x=x, y=y)
    data.save_npz(ds, tmp_path / "raw.npz")
    _assert_same(data.load_npz(tmp_path / "raw.npz"), ds)
    # a directory is named as such (it was an IsADirectoryError naming a temporary file)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError,
                       match=rf"save_npz: {re.escape(str(folder))} is a directory"):
        data.save_npz(ds, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arr.npy", "folder", "notes.txt",
                                                          "raw.npz", "toy.csv", "toy.npz"]
    # classes load_npz would refuse are refused before writing
    unsorted = data.Dataset(torch.zeros(2, 1), torch.tensor([0, 1]), (True, False))
    with pytest.raises(ValueError, match=r"dataset\.classes must be sorted and distinct"):
        data.save_npz(unsorted, tmp_path / "unsorted.npz")
    assert not (tmp_path / "unsorted.npz").exists()
    # a link would be replaced by a file, its target left with the old data
    (tmp_path / "link.npz").symlink_to(tmp_path / "toy.npz")
    with pytest.raises(FileExistsError, match="link.npz is a symbolic link"):
        data.save_npz(ds, tmp_path / "link.npz")
    assert (tmp_path / "link.npz").is_symlink()


def _npz_with_header(path: Path, shape: tuple) -> Path:
    """An .npz whose x header claims ``shape`` although it holds 2 x 2 float32."""
    raw = io.BytesIO()
    np.lib.format.write_array_header_1_0(raw, {"descr": "<f4", "fortran_order": False,
                                               "shape": shape})
    raw.write(np.zeros((2, 2), np.float32).tobytes())
    labels = io.BytesIO()
    np.save(labels, np.arange(2))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", raw.getvalue())
        zf.writestr("y.npy", labels.getvalue())
    return path


def test_npz_that_is_not_an_npz_archive(tmp_path, monkeypatch):
    """A .npy gave a TypeError about context managers, a text file a suggestion to unpickle
    it, and a header claiming a huge shape a raw MemoryError."""
    x, y = _small()
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"x\.npy: not an \.npz archive \(a single \.npy array"):
        data.load_npz(tmp_path / "x.npy")
    with pytest.raises(DataError, match=r"x\.npy: not an \.npz archive"):
        data.load_dataset(tmp_path / "x.npy")
    csv = _write(tmp_path / "csv.npz", _shokri_text(x, y))
    with pytest.raises(DataError, match=r"csv\.npz: not an \.npz archive \(it starts like "
                       r"text") as info:
        data.load_npz(csv)
    assert "pickle" not in str(info.value)
    assert "read it as format 'shokri'" in str(info.value)
    # and the other way round: an .npz or .npy read as a CSV was blamed on CR line endings
    data.save_npz(data.from_arrays(x, y), tmp_path / "real.npz")
    for path, kind in ((tmp_path / "real.npz", "a zip archive"),
                       (tmp_path / "x.npy", r"a \.npy array")):
        with pytest.raises(DataError, match=rf"line 1: {kind}.*not a text file of records"):
            data.load_shokri_csv(path, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"empty\.npz: not an \.npz archive \(the file is empty"):
        data.load_npz(_write(tmp_path / "empty.npz", b""))
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}: a directory"):
        data.load_npz(tmp_path)
    huge = _npz_with_header(tmp_path / "huge.npz", (99999999999, 2))
    with pytest.raises(DataError, match=r"huge\.npz: array 'x' claims shape \(99999999999, 2\) "
                       r"of float32 \(799,999,999,992 bytes\), but its member holds 16 bytes"):
        data.load_npz(huge)
    # an array that is as large as its header says, but beyond memory: restated by name
    def out_of_memory(*args, **kwargs):
        raise MemoryError()
    good = _npz_with_header(tmp_path / "good.npz", (2, 2))
    monkeypatch.setattr(np.lib.format, "read_array", out_of_memory)
    with pytest.raises(DataError, match=r"good\.npz: array 'x' of shape \(2, 2\) \(float32\) "
                       r"does not fit in memory"):
        data.load_npz(good)


@pytest.mark.parametrize("classes, fragment", [
    ([10, 10, 30], r"classes\[0\] = 10 and classes\[1\] = 10 are a duplicate"),
    ([30, 10, 20], r"classes\[0\] = 30 and classes\[1\] = 10 are out of order"),
    ([np.nan, 1.0, 2.0], r"holds NaN at index 0"),
    (["b", "a", "c"], r"classes\[0\] = 'b' and classes\[1\] = 'a' are out of order"),
])
def test_npz_classes_must_be_sorted_and_distinct(tmp_path, classes, fragment):
    """classes[i] is the i-th smallest original label: duplicates, disorder or NaN were
    loaded as given."""
    x, y = _small(n=6)
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.arange(6) % 3, classes=np.array(classes))
    with pytest.raises(DataError, match=rf"bad\.npz: array 'classes' .*{fragment}"):
        data.load_npz(path)


def test_from_arrays(tmp_path):
    x, y = _small()
    a = data.from_arrays(torch.from_numpy(x).double(), torch.from_numpy(y))
    b = data.from_arrays(x.tolist(), (y * 1.0).tolist(), name="lists")
    _assert_same(a, b)
    assert a.name == "arrays" and b.name == "lists" and isinstance(a.classes[0], int)
    with pytest.raises(ValueError, match="2-D"):
        data.from_arrays(x[0], y[:1])
    with pytest.raises(ValueError, match="one label per row"):
        data.from_arrays(x, y[:-1])
    with pytest.raises(ValueError, match="finite"):
        data.from_arrays(np.where(x > 0, np.inf, 0), y)
    with pytest.raises(ValueError, match="whole-number"):
        data.from_arrays(x, y + 0.5)
    with pytest.raises(ValueError, match="whole-number labels within int64, got 1e\\+300 at row 0"):
        data.from_arrays(x, np.where(np.arange(len(y)) == 0, 1e300, y))
    with pytest.raises(TypeError, match="numbers"):
        data.from_arrays(np.array([["a"]]), [1])
    with pytest.raises(ValueError, match="no rows"):
        data.from_arrays(np.zeros((0, 3)), [])
    with pytest.raises(ValueError, match=r"no features \(shape \(3, 0\), d = 0\)"):
        data.from_arrays(np.zeros((3, 0)), [0, 1, 2])
    with pytest.raises(ValueError, match="x must be a rectangular"):
        data.from_arrays([[1, 2], [3]], [0, 1])
    with pytest.raises(ValueError, match=r"one label \('b'\) on every row.*two classes"):
        data.from_arrays(x, ["b"] * len(y))
    # a mask was dropped silently: masked entries are refused, an empty mask is fine
    masked = np.ma.masked_array(x, mask=x > 0)
    with pytest.raises(ValueError, match=r"x is a masked array with \d+ masked entries"):
        data.from_arrays(masked, y)
    with pytest.raises(ValueError, match=r"y is a masked array with 1 masked entries"):
        data.from_arrays(x, np.ma.masked_array(y, mask=np.arange(len(y)) == 3))
    _assert_same(data.from_arrays(np.ma.masked_array(x, mask=False),
                                  np.ma.masked_array(y)), data.from_arrays(x, y))
    # bfloat16 tensors (numpy has no such dtype) convert exactly
    _assert_same(data.from_arrays(torch.from_numpy(x).bfloat16(), torch.from_numpy(y).bfloat16()),
                 a)


def test_load_dataset_dispatch(tmp_path):
    x, y = _small()
    csv = _write(tmp_path / "p.csv", _shokri_text(x, y))
    ref = data.load_dataset(csv, cache_dir=tmp_path / "c")
    assert ref.name == "p"
    data.save_npz(ref, tmp_path / "p.npz")
    _assert_same(data.load_dataset(tmp_path / "p.npz"), ref)
    _assert_same(data.load_dataset(_tar(tmp_path / "p.tgz", {"p": _shokri_text(x, y)}),
                                   cache_dir=tmp_path / "c"), ref)
    feats, labels = _texas_files(x, y)
    folder = tmp_path / "tex"
    folder.mkdir()
    _write(folder / "feats", feats)
    _write(folder / "labels", labels)
    _assert_same(data.load_dataset(folder, cache_dir=tmp_path / "c"), ref)
    archive = _tar(tmp_path / "tex.tgz", {"t/feats": feats, "t/labels": labels})
    _assert_same(data.load_dataset(archive, cache_dir=tmp_path / "c"), ref)
    _assert_same(data.load_dataset(csv, format="shokri", cache_dir=tmp_path / "c"), ref)
    with pytest.raises(ValueError, match="format must be one of"):
        data.load_dataset(csv, format="csv")
    with pytest.raises(FileNotFoundError):
        data.load_dataset(tmp_path / "missing")


# ----------------------------------------------------------------------------- Dataset

def test_dataset_checks_and_subset():
    x, y = torch.rand(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    ds = data.Dataset(x, y, ("a", "b", "c"), "toy")
    sub = ds.subset(torch.tensor([5, 0]))
    assert (sub.n, sub.d, sub.k, sub.classes, sub.name) == (2, 3, 3, ("a", "b", "c"), "toy")
    assert torch.equal(sub.x, x[[5, 0]]) and sub.y.tolist() == [2, 0]
    only_a = ds.subset(y == 0)
    assert only_a.k == 3 and only_a.n == 2  # k is the data set's, not the subset's
    assert "n=6, d=3, k=3" in repr(ds)
    with pytest.raises(ValueError, match="float32"):
        data.Dataset(x.double(), y, ("a", "b", "c"))
    with pytest.raises(ValueError, match="int64"):
        data.Dataset(x, y.int(), ("a", "b", "c"))
    with pytest.raises(ValueError, match="class indices"):
        data.Dataset(x, y, ("a", "b"))
    with pytest.raises(ValueError, match="at least two classes"):
        data.Dataset(x, torch.zeros(6, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="bool mask"):
        ds.subset(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="integer indices"):
        ds.subset(torch.tensor([0.0]))
    # uint8 holds indices here, as the check says (torch would read it as a mask)
    assert ds.subset(torch.tensor([1, 0, 1], dtype=torch.uint8)).y.tolist() == [1, 0, 1]
    assert ds.subset([]).n == 0 and ds.subset([-1]).y.tolist() == [2]
    with pytest.raises(IndexError, match="index 6 is out of range for a data set of 6 rows"):
        ds.subset([0, 6])
    with pytest.raises(ValueError, match=r"1-D, got shape \(1, 1\)"):
        ds.subset([[0]])


# ----------------------------------------------------------------------------- Location30

@pytest.mark.skipif(not LOCATION30.is_file(), reason=f"the real Location30 file is not at "
                    f"{LOCATION30} (only the development machines have it)")
def test_real_location30(tmp_path):
    ds = data.load_shokri_csv(LOCATION30, cache_dir=tmp_path)
    assert (ds.n, ds.d, ds.k) == (5010, 446, 30)
    assert ds.classes == tuple(range(1, 31))
    assert set(torch.unique(ds.x).tolist()) == {0.0, 1.0}
    ones = ds.x.sum(1)
    assert ones.min() == 21 and ones.max() == 205  # data/README.md
    counts = torch.bincount(ds.y, minlength=30)
    assert counts.min() == 97 and counts.max() == 308
    _assert_same(data.load_dataset(LOCATION30, cache_dir=tmp_path), ds)  # cached
    splits = data.make_splits(ds, seed=0)
    assert splits.preset == "proportional"
    assert splits.sizes() == {"train": 1112, "test": 1112, "known": 556, "target": 556,
                              "target_members": 278, "target_nonmembers": 278,
                              "shadow_pool": 2508}


# ----------------------------------------------------------------------------- splits

def _blank(n: int, d: int = 2, k: int = 100) -> data.Dataset:
    return data.Dataset(torch.zeros(n, d), torch.arange(n) % k, tuple(range(k)), "blank")


def _check_membership(splits: data.Splits, n: int):
    sets = {name: set(getattr(splits, name).tolist())
            for name in ("train", "test", "known", "target", "shadow_pool")}
    for name, idx in sets.items():
        assert len(idx) == len(getattr(splits, name)), f"{name} repeats rows"
        assert all(0 <= i < n for i in idx)
    members = set(splits.target[splits.target_member].tolist())
    outsiders = set(splits.target[~splits.target_member].tolist())
    assert len(members) == len(outsiders)  # equal numbers
    assert sets["known"] <= sets["train"]
    assert members <= sets["train"] - sets["known"]
    for a, b in [("train", "test"), ("train", "shadow_pool"), ("test", "shadow_pool")]:
        assert not sets[a] & sets[b], f"{a} and {b} overlap"
    assert not outsiders & (sets["train"] | sets["test"] | sets["shadow_pool"])
    assert splits.target_member.dtype == torch.bool
    assert all(getattr(splits, name).dtype == torch.int64 for name in sets)
    splits.check(n)  # the check the attacks run agrees with the definitions above


def test_splits_membership_definitions_hold():
    splits = data.make_splits(_blank(5010), seed=3)
    _check_membership(splits, 5010)
    # members are shuffled among the target rows, not all first
    assert 0 < splits.target_member[:len(splits.target) // 2].sum() < len(splits.target) // 2


def test_splits_presets_and_sizes():
    paper = data.make_splits(_blank(85_000), preset="purchase100")
    assert paper.sizes() == {"train": 20_000, "test": 20_000, "known": 10_000,
                             "target": 10_000, "target_members": 5_000,
                             "target_nonmembers": 5_000, "shadow_pool": 40_000}
    _check_membership(paper, 85_000)
    texas = data.make_splits(_blank(67_330), preset="texas100", seed=1)
    assert (texas.sizes()["train"], texas.sizes()["known"], texas.sizes()["shadow_pool"]) == \
        (10_000, 5_000, 67_330 - 22_500)
    # auto: the paper's sizes for Purchase100's shape when they fit, proportional otherwise
    purchase_shaped = data.Dataset(torch.zeros(85_000, 600), torch.arange(85_000) % 100,
                                   tuple(range(100)))
    assert data.make_splits(purchase_shaped).preset == "purchase100"
    assert data.make_splits(purchase_shaped.subset(torch.arange(84_999))).preset == \
        "proportional"
    assert data.make_splits(_blank(85_000)).preset == "proportional"  # d = 2
    assert data.make_splits(_blank(18)).sizes()["train"] == 4


def test_splits_deterministic_per_seed():
    ds = _blank(3000)
    a, b, c = (data.make_splits(ds, seed=s) for s in (7, 7, 8))
    for name in ("train", "test", "known", "target", "target_member", "shadow_pool"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.train, c.train) and not torch.equal(a.target, c.target)
    assert a.sizes() == c.sizes()


def test_splits_custom_sizes_and_errors():
    ds = _blank(1000)
    custom = data.make_splits(ds, sizes={"train": 200, "test": 100, "known": 50, "target": 60,
                                         "shadow_pool": 300})
    assert custom.preset == "custom"
    assert custom.sizes() == {"train": 200, "test": 100, "known": 50, "target": 60,
                              "target_members": 30, "target_nonmembers": 30,
                              "shadow_pool": 300}
    _check_membership(custom, 1000)
    # partial overrides keep the rest of the rule
    partial = data.make_splits(ds, preset="proportional", sizes={"known": 10})
    assert partial.sizes()["known"] == 10 and partial.sizes()["train"] == 220
    with pytest.raises(ValueError, match="85000 rows"):
        data.make_splits(ds, preset="purchase100")
    with pytest.raises(ValueError, match="1100"):
        data.make_splits(ds, sizes={"train": 500, "test": 500, "known": 0, "target": 200,
                                    "shadow_pool": 0})
    with pytest.raises(ValueError, match="even"):
        data.make_splits(ds, sizes={"target": 7})
    with pytest.raises(ValueError, match="must fit in train"):
        data.make_splits(ds, sizes={"train": 100, "known": 90, "target": 40})
    with pytest.raises(ValueError, match="unknown size keys"):
        data.make_splits(ds, sizes={"validation": 5})
    # a list of pairs was reported as one unknown key
    with pytest.raises(TypeError, match="sizes must be a mapping .* got list"):
        data.make_splits(ds, sizes=[("train", 10)])
    with pytest.raises(ValueError, match="preset must be one of"):
        data.make_splits(ds, preset="location30")
    with pytest.raises(ValueError, match="at least 18"):
        data.make_splits(_blank(17))
    with pytest.raises(TypeError, match="seed must be an int"):
        data.make_splits(ds, seed=1.5)


def test_splits_check_refuses_splits_that_break_the_definitions():
    """Hand-made splits reach the attacks unchecked by make_splits: each broken definition
    is refused by name (an overlapping shadow pool or a wrong target_member gave a silently
    wrong attack)."""
    import dataclasses
    good = data.make_splits(_blank(1000), seed=0)
    good.check(1000)
    train, pool, test = good.train, good.shadow_pool, good.test
    member_row = good.target[good.target_member][0]
    flipped = good.target_member.clone()
    flipped[3] = ~flipped[3]
    cases = [
        (dict(shadow_pool=torch.cat([pool, train[:5]])), ValueError,
         r"splits\.shadow_pool and splits\.train share 5 rows"),
        (dict(shadow_pool=torch.cat([pool, pool[:1]])), ValueError,
         rf"splits\.shadow_pool lists a row more than once \(row {int(pool[0])}\)"),
        (dict(train=torch.cat([train, train[-1:]])), ValueError, r"splits\.train lists a row"),
        (dict(test=torch.cat([test, train[:2]])), ValueError,
         r"splits\.test and splits\.train share 2 rows"),
        (dict(shadow_pool=torch.cat([pool, member_row[None]])), ValueError,
         r"splits\.shadow_pool and splits\.train share"),
        (dict(known=torch.cat([good.known, pool[:1]])), ValueError,
         r"splits\.known holds 1 rows outside splits\.train"),
        (dict(known=torch.cat([good.known, member_row[None]])), ValueError,
         r"splits\.target and splits\.known share 1 rows"),
        (dict(target_member=flipped), ValueError,
         r"splits\.target_member\[3\] .* \(1 entries disagree\)"),
        (dict(target_member=good.target_member.long()), TypeError,
         r"splits\.target_member must be a bool tensor shaped like splits\.target"),
        (dict(target_member=good.target_member[:-1]), TypeError, r"got torch\.bool"),
        (dict(test=test.int()), TypeError, r"splits\.test must be a 1-D int64 tensor"),
        (dict(known=good.known[None]), TypeError, r"splits\.known must be a 1-D"),
        (dict(train=torch.cat([train, torch.tensor([1000])])), ValueError,
         r"splits\.train indexes rows up to 1000 but data has 1000 rows"),
    ]
    for fields, kind, message in cases:
        with pytest.raises(kind, match=message):
            dataclasses.replace(good, **fields).check(1000)
    # rows in no set, and a target without members, break no definition
    dataclasses.replace(good, shadow_pool=pool[:10], test=test[:0]).check(1000)
    outsiders = ~good.target_member
    dataclasses.replace(good, target=good.target[outsiders],
                        target_member=good.target_member[outsiders]).check(1000)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_purchase_shape_density_and_seed():
    a = data.synthetic_purchase(4000, seed=0)
    assert (a.n, a.d, a.k, a.name) == (4000, 600, 100, "synthetic-purchase")
    assert a.classes == tuple(range(100))
    assert set(torch.unique(a.x).tolist()) == {0.0, 1.0}
    assert abs(a.x.mean().item() - 0.1) < 0.003  # Purchase-like density
    assert torch.bincount(a.y, minlength=100).min() > 10  # every class present
    b = data.synthetic_purchase(4000, seed=0)
    _assert_same(a, b)
    c = data.synthetic_purchase(4000, seed=1)
    assert not torch.equal(a.x, c.x) and not torch.equal(a.y, c.y)
    small = data.synthetic_purchase(50, d=20, k=3, seed=2)
    assert (small.n, small.d, small.k) == (50, 20, 3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        data.synthetic_purchase(0)
    with pytest.raises(TypeError, match="k must be an int"):
        data.synthetic_purchase(10, k=2.0)


def test_synthetic_purchase_is_learnable_but_not_trivial():
    """Class structure is real (a nearest-prototype rule beats chance by far) but rows are
    noisy (it stays well below 1): the cheap half of the overfitting claim."""
    ds = data.synthetic_purchase(6000, seed=0)
    x, y = ds.x[:5000], ds.y[:5000]
    means = torch.zeros(100, 600).index_add_(0, y, x) / torch.bincount(y, minlength=100)[:, None]
    pred = (ds.x[5000:] @ means.T.log().clamp(min=-20) +
            (1 - ds.x[5000:]) @ (1 - means.T).log().clamp(min=-20)).argmax(1)
    acc = (pred == ds.y[5000:]).float().mean().item()
    assert 0.3 < acc < 0.8, acc


@pytest.mark.slow
def test_synthetic_purchase_overfits_the_paper_mlp():
    """The paper's undefended MLP fits every training row and generalizes much worse
    (the gap membership inference feeds on); settings in synthetic_purchase's docstring."""
    torch.manual_seed(0)
    ds = data.synthetic_purchase(10_000, seed=0)
    x, y, x_test, y_test = ds.x[:5000], ds.y[:5000], ds.x[5000:], ds.y[5000:]
    layers, width = [], 600
    for h in (1024, 512, 256, 128):
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, 100))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        for idx in torch.randperm(5000, generator=gen).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_acc = (model(x).argmax(1) == y).float().mean().item()
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert train_acc > 0.98, train_acc
    assert 0.4 < test_acc < 0.75, test_acc
    assert train_acc - test_acc > 0.25
