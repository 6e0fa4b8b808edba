"""Both storage backends behave the same: atomic writes, ranges, listing and publish_dir."""

from __future__ import annotations

import hashlib
import io

import pytest

from jobs.storage import LocalStorage, ObjectMissing, S3Storage, check_key
from tests.service.conftest import make_bucket

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_server")
    return S3Storage(
        make_bucket(endpoint),
        "some/prefix",
        endpoint_url=endpoint,
        access_key_id="testing",
        secret_access_key="testing",
    )


def test_put_read_ranges_delete(storage, tmp_path):
    data = bytes(range(256)) * 5000  # > one chunk
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    storage.put_file("teams/t/blob.bin", src)
    assert src.exists()
    assert storage.exists("teams/t/blob.bin")
    assert storage.size("teams/t/blob.bin") == len(data)
    assert b"".join(storage.iter_range("teams/t/blob.bin")) == data
    assert b"".join(storage.iter_range("teams/t/blob.bin", 10, 20)) == data[10:20]
    assert b"".join(storage.iter_range("teams/t/blob.bin", len(data) - 5)) == data[-5:]
    storage.put_stream("teams/t/s.txt", io.BytesIO(b"hello"))
    assert storage.list("teams/t") == ["teams/t/blob.bin", "teams/t/s.txt"]
    out = tmp_path / "copy.bin"
    storage.get_file("teams/t/blob.bin", out)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    storage.delete("teams/t/blob.bin")
    storage.delete("teams/t/blob.bin")  # missing is fine
    assert not storage.exists("teams/t/blob.bin")
    with pytest.raises(ObjectMissing):
        storage.size("teams/t/blob.bin")
    assert storage.delete_prefix("teams/t") == 1
    assert storage.list("teams") == []
    storage.ping()


def test_put_file_move_consumes_the_source(storage, tmp_path):
    src = tmp_path / "upload.part"
    src.write_bytes(b"x" * 100)
    storage.put_file("a/b.bin", src, move=True)
    assert not src.exists()
    assert storage.size("a/b.bin") == 100


def test_publish_dir_replaces_a_previous_attempt_as_a_whole(storage, tmp_path):
    first = tmp_path / "first"
    (first / "unet").mkdir(parents=True)
    (first / "unet" / "w.safetensors").write_bytes(b"old")
    (first / "stale.txt").write_text("from attempt 1")
    storage.publish_dir(first, "teams/t/jobs/j")
    second = tmp_path / "second"
    (second / "unet").mkdir(parents=True)
    (second / "unet" / "w.safetensors").write_bytes(b"new")
    (second / "metrics.json").write_text("{}")
    keys = storage.publish_dir(second, "teams/t/jobs/j")
    assert keys == {
        "metrics.json": "teams/t/jobs/j/metrics.json",
        "unet/w.safetensors": "teams/t/jobs/j/unet/w.safetensors",
    }
    assert storage.list("teams/t/jobs/j") == sorted(keys.values())
    assert b"".join(storage.iter_range("teams/t/jobs/j/unet/w.safetensors")) == b"new"
    assert storage.list("") == sorted(keys.values())  # nothing left under the temporary prefix


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../b", "a\\b", "", "a/./b"])
def test_keys_cannot_escape_the_root(key):
    with pytest.raises(ValueError):
        check_key(key)
