"""Forget sets: happy paths, and one generated hostile input for every refusal rule.

Every archive and image is built in memory by the test itself; each refusal asserts the error's
``rule`` and the ``file`` it names.
"""

from __future__ import annotations

import io
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vdu_core.config import Limits
from vdu_core.errors import ForgetSetError
from vdu_core.forget_set import DecodedImage, decode_forget_set, inspect_forget_set, to_tensor

# --------------------------------------------------------------------------- builders


def png(size=(16, 16), mode="L", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    im = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    return encode(im, "PNG", **save)


def encode(im: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def refused(source, rule: str, file: str | None = "<any>", limits: Limits | None = None) -> ForgetSetError:
    with pytest.raises(ForgetSetError) as info:
        decode_forget_set(source, limits)
    err = info.value
    assert err.rule == rule, f"expected {rule}, got {err.rule}: {err}"
    if file != "<any>":
        assert err.file == file, f"expected file {file!r}, got {err.file!r}: {err}"
    assert err.to_dict()["code"] == "invalid_forget_set"
    return err


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- happy paths


def test_zip_tar_folder_and_single_file_decode_the_same_images(tmp_path):
    members = {
        "digits/a.png": png(seed=1),
        "digits/b.png": png((20, 12), "RGB", seed=2),
        "c.jpg": png(seed=3),
    }
    members["d.webp"] = encode(Image.new("RGB", (16, 16), (200, 10, 10)), "WEBP", lossless=True)
    members["e.jpg"] = encode(Image.new("L", (16, 16), 128), "JPEG", quality=95)
    expected = {"digits/a.png", "digits/b.png", "c.jpg", "d.webp", "e.jpg"}
    sources = {
        "zip": write(tmp_path, "set.zip", zip_bytes(members)),
        "tar.gz": write(tmp_path, "set.tar.gz", tar_bytes(list(members.items()), "w:gz")),
        "tar.xz": write(tmp_path, "set.tar.xz", tar_bytes(list(members.items()), "w:xz")),
        "tar": write(tmp_path, "set.tar", tar_bytes(list(members.items()))),
    }
    folder = tmp_path / "folder"
    for name, data in members.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    sources["folder"] = folder
    shas = set()
    for kind, source in sources.items():
        images = decode_forget_set(source)
        assert {i.name for i in images} == expected, kind
        by_name = {i.name: i for i in images}
        assert by_name["digits/b.png"].image.mode == "RGB" and (
            by_name["digits/b.png"].width,
            by_name["digits/b.png"].height,
        ) == (20, 12)
        assert (
            by_name["digits/a.png"].image.mode == "L" and by_name["c.jpg"].format == "PNG"
        )  # content decides
        assert by_name["d.webp"].format == "WEBP" and by_name["e.jpg"].format == "JPEG"
        shas.add(inspect_forget_set(source)["content_sha256"])
    assert len(shas) == 1  # the same images, whatever the container
    single = decode_forget_set(write(tmp_path, "one.png", members["digits/a.png"]))
    assert [i.name for i in single] == ["one.png"]
    assert decode_forget_set(members["digits/a.png"])[0].sha256 == single[0].sha256  # bytes work too
    with open(sources["zip"], "rb") as fh:  # and so do open files (an upload being validated)
        assert len(decode_forget_set(fh)) == 5


def test_junk_is_ignored_and_dot_slash_names_are_fine():
    data = tar_bytes([tar_entry(".", tarfile.DIRTYPE), ("./a.png", png()), ("./.DS_Store", b"\0" * 100)])
    assert [i.name for i in decode_forget_set(data)] == ["a.png"]
    data = zip_bytes({"a.png": png(), "__MACOSX/._a.png": b"junk", "Thumbs.db": b"x", "sub/": b""})
    assert [i.name for i in decode_forget_set(data)] == ["a.png"]


def test_inspect_summarises_without_pixels(tmp_path):
    source = write(tmp_path, "s.zip", zip_bytes({"a.png": png((16, 8)), "b.png": png((9, 9), "RGB")}))
    info = inspect_forget_set(source, Limits())
    assert info["count"] == 2 and info["sizes"] == [[16, 8], [9, 9]]
    assert info["modes"] == {"L": 1, "RGB": 1}
    assert info["total_bytes"] == sum(i["bytes"] for i in info["images"])
    import hashlib

    assert info["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


@pytest.mark.parametrize("channels", [1, 3])
def test_to_tensor_converts_channels_and_resolution(channels):
    images = decode_forget_set(
        zip_bytes({"g.png": png((40, 30), "L"), "c.png": png((28, 28), "RGB", seed=5)})
    )
    x = to_tensor(images, channels=channels, resolution=28)
    assert x.shape == (2, channels, 28, 28) and str(x.dtype) == "torch.float32"
    assert x.min() >= -1.0 and x.max() <= 1.0
    # A 28x28 image is not resampled: its pixels map exactly to [-1, 1].
    c = next(i for i in images if i.name == "c.png").image.convert("L" if channels == 1 else "RGB")
    expected = np.asarray(c, dtype=np.float32) / 127.5 - 1.0
    got = x[[i.name for i in images].index("c.png")].numpy()
    np.testing.assert_allclose(
        got if channels == 3 else got[0],
        expected.transpose(2, 0, 1) if channels == 3 else expected,
        atol=1e-6,
    )
    if channels == 3:  # grey replicated to three equal channels
        g = x[[i.name for i in images].index("g.png")]
        assert (g[0] == g[1]).all() and (g[1] == g[2]).all()


def test_to_tensor_center_crops_before_resizing():
    im = Image.new("L", (30, 10), 0)
    im.paste(255, (10, 0, 20, 10))  # the white square is the centre of a wide image
    x = to_tensor([DecodedImage("w", im, 30, 10, "")], channels=1, resolution=10)
    assert x.min() == 1.0  # the black margins were cropped away


def test_forget_set_module_is_torch_free():
    code = (
        "import sys, vdu_core.forget_set as f; f.decode_forget_set(sys.stdin.buffer.read()); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], input=png(), capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()


# --------------------------------------------------------------------------- image modes: accept and convert


def test_16bit_png_becomes_8bit_grey():
    arr = np.array([[0, 257 * 128, 65535, 1000]] * 8, dtype=np.uint16)
    [img] = decode_forget_set(encode(Image.fromarray(arr), "PNG"), Limits(min_side=4))
    assert img.source_mode.startswith("I") and img.image.mode == "L"
    assert np.asarray(img.image)[0].tolist() == [0, 128, 255, 4]


def test_cmyk_jpeg_becomes_rgb():
    [img] = decode_forget_set(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert img.source_mode == "CMYK" and img.image.mode == "RGB"
    r, g, b = img.image.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full: red


def test_palette_png_becomes_rgb_or_grey():
    colour = Image.new("RGB", (16, 16), (10, 200, 30)).quantize(4)
    [img] = decode_forget_set(encode(colour, "PNG"))
    assert img.source_mode == "P" and img.image.mode == "RGB" and img.image.getpixel((0, 0)) == (10, 200, 30)
    grey = Image.new("L", (16, 16), 77).convert("P")
    [img] = decode_forget_set(encode(grey, "PNG"))
    assert img.image.mode == "L" and img.image.getpixel((0, 0)) == 77


def test_alpha_is_composited_onto_black():
    rgba = Image.new("RGBA", (16, 16), (200, 100, 50, 0))
    rgba.paste((200, 100, 50, 255), (0, 0, 8, 16))
    [img] = decode_forget_set(encode(rgba, "PNG"))
    assert img.image.mode == "RGB"
    assert img.image.getpixel((2, 2)) == (200, 100, 50) and img.image.getpixel((12, 2)) == (0, 0, 0)
    [la] = decode_forget_set(png(mode="LA"))
    assert la.image.mode == "L"


# --------------------------------------------------------------------------- hostile archives


def test_zip_bomb_by_ratio_is_refused_from_headers():
    data = zip_bytes({"ok.png": png(), "bomb.png": b"\0" * (4 * 1024 * 1024)})
    refused(data, "compression_ratio", "bomb.png")


def test_zip_member_lying_about_its_size_is_refused():
    data = bytearray(zip_bytes({"a.png": b"\0" * (2 * 1024 * 1024)}, zipfile.ZIP_DEFLATED))
    # Patch the central directory so the member claims 1000 bytes (ratio looks harmless).
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, 1000)
    err = refused(bytes(data), "corrupt_archive", "a.png")
    assert "a.png" in str(err)


def test_tar_gz_bomb_is_stopped_while_streaming():
    members = [(f"z{i}.png", b"\0" * (1024 * 1024)) for i in range(4)]
    refused(tar_bytes(members, "w:gz"), "compression_ratio", limits=Limits(max_file_bytes=2 * 1024 * 1024))


def test_tar_pax_header_bomb_is_stopped_before_tarfile_reads_it():
    info = tarfile.TarInfo("a.png")
    info.pax_headers = {"comment": "x" * (4 * 1024 * 1024)}
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(ForgetSetError) as err:
        decode_forget_set(data.getvalue(), Limits(max_total_bytes=1024 * 1024))
    assert err.value.rule in ("compression_ratio", "total_bytes")


@pytest.mark.parametrize(
    "name, rule",
    [
        ("/etc/evil.png", "path_traversal"),
        ("../evil.png", "path_traversal"),
        ("a/../../evil.png", "path_traversal"),
        ("..\\..\\evil.png", "path_traversal"),
        ("C:/Windows/evil.png", "path_traversal"),
        ("c:evil.png", "path_traversal"),
        ("bad\nname.png", "bad_name"),
    ],
)
def test_path_tricks_are_refused_in_zip_and_tar(name, rule):
    refused(zip_bytes({"ok.png": png(), name: png()}), rule, name)
    refused(tar_bytes([("ok.png", png()), (name, png())]), rule, name)


def test_tar_links_and_devices_are_refused():
    refused(
        tar_bytes([("a.png", png()), tar_entry("link.png", tarfile.SYMTYPE, "/etc/passwd")]),
        "symlink",
        "link.png",
    )
    refused(
        tar_bytes([("a.png", png()), tar_entry("hard.png", tarfile.LNKTYPE, "a.png")]), "hardlink", "hard.png"
    )
    refused(tar_bytes([tar_entry("dev.png", tarfile.CHRTYPE)]), "special_file", "dev.png")
    refused(tar_bytes([tar_entry("fifo.png", tarfile.FIFOTYPE)]), "special_file", "fifo.png")


def test_zip_symlink_member_is_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.png", png())
        info = zipfile.ZipInfo("link.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    refused(buf.getvalue(), "symlink", "link.png")


def test_nested_archives_are_refused_by_name_and_by_content():
    inner = zip_bytes({"a.png": png()})
    refused(zip_bytes({"a.png": png(), "inner.zip": inner}), "nested_archive", "inner.zip")
    refused(zip_bytes({"a.png": png(), "sneaky.png": inner}), "nested_archive", "sneaky.png")
    refused(tar_bytes([("x.tar.gz", tar_bytes([("a.png", png())], "w:gz"))]), "nested_archive", "x.tar.gz")


def test_thousands_of_tiny_files_beyond_max_files():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(2000):
            zf.writestr(f"f{i:04d}.png", b"x")
    refused(buf.getvalue(), "too_many_files", "f1000.png")
    refused(
        tar_bytes([(f"f{i}.png", png(seed=i)) for i in range(5)]),
        "too_many_files",
        "f3.png",
        Limits(max_files=3),
    )


def test_folder_with_too_many_files(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.png").write_bytes(png(seed=i))
    refused(tmp_path, "too_many_files", "f3.png", Limits(max_files=3))


def test_total_and_file_byte_limits():
    members = {f"{c}.png": png((32, 32), "RGB", seed=i) for i, c in enumerate("abc")}
    size = len(members["a.png"])
    refused(zip_bytes(members), "total_bytes", "c.png", Limits(max_total_bytes=int(size * 2.5)))
    refused(tar_bytes(list(members.items())), "total_bytes", "c.png", Limits(max_total_bytes=int(size * 2.5)))
    refused(zip_bytes(members), "file_bytes", "a.png", Limits(max_file_bytes=size - 1))
    refused(png((32, 32), "RGB"), "file_bytes", "<upload>", Limits(max_file_bytes=100))


def test_empty_archives_and_folders(tmp_path):
    refused(zip_bytes({}), "empty", None)
    refused(zip_bytes({"__MACOSX/._a.png": b"x", ".DS_Store": b"x"}), "empty", None)
    refused(tar_bytes([]), "empty", None)
    refused(write(tmp_path, "e.tar", tar_bytes([])), "empty", None)
    refused(write(tmp_path, "e.tgz", tar_bytes([tar_entry("d", tarfile.DIRTYPE)], "w:gz")), "empty", None)
    (tmp_path / "e.tar").unlink()
    (tmp_path / "e.tgz").unlink()
    refused(tmp_path, "empty", None)


def test_non_archive_with_archive_extension(tmp_path):
    refused(write(tmp_path, "set.zip", b"this is not a zip at all"), "not_an_archive", "set.zip")
    refused(write(tmp_path, "set.tar.gz", png()), "not_an_archive", "set.tar.gz")
    refused(write(tmp_path, "set.tgz", b"\x1f\x8b" + b"garbage" * 10), "not_an_archive", "set.tgz")
    refused(write(tmp_path, "set.7z", b"7z\xbc\xaf\x27\x1c" + bytes(50)), "not_an_archive", "set.7z")


def test_missing_source(tmp_path):
    refused(tmp_path / "nope.zip", "not_found")


def test_folder_symlinks_and_fifos_are_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    refused(tmp_path, "symlink", "link.png")
    (tmp_path / "link.png").unlink()
    (tmp_path / "sub").symlink_to("/etc")
    refused(tmp_path, "symlink", "sub")
    (tmp_path / "sub").unlink()
    import os

    os.mkfifo(tmp_path / "pipe.png")
    refused(tmp_path, "special_file", "pipe.png")


def test_duplicate_and_encrypted_zip_members():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.png", png())
        with pytest.warns(UserWarning):
            zf.writestr("a.png", png(seed=1))
    refused(buf.getvalue(), "duplicate_name", "a.png")
    data = bytearray(zip_bytes({"s.png": png()}))
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<H", data, cd + 8, struct.unpack_from("<H", data, cd + 8)[0] | 1)
    refused(bytes(data), "encrypted", "s.png")
    data = bytearray(zip_bytes({"m.png": png()}, zipfile.ZIP_STORED))
    struct.pack_into("<H", data, data.rfind(b"PK\x01\x02") + 10, 99)  # an unknown compression method
    refused(bytes(data), "unsupported_compression", "m.png")


def test_total_decoded_pixels_are_bounded(monkeypatch):
    from vdu_core import forget_set

    monkeypatch.setattr(forget_set, "MAX_TOTAL_PIXELS", 300)
    members = {"a.png": png(seed=1), "b.png": png(seed=2)}  # 256 pixels each
    refused(zip_bytes(members), "total_pixels", "b.png", Limits(max_pixels=256))


# --------------------------------------------------------------------------- hostile images


def test_text_file_named_png():
    refused(zip_bytes({"a.png": png(), "notes.png": b"just some text, really"}), "not_an_image", "notes.png")
    refused(zip_bytes({"readme.txt": b"hello"}), "not_an_image", "readme.txt")
    refused(encode(Image.new("RGB", (16, 16)), "BMP"), "not_an_image", "<upload>")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images(fmt):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    refused(zip_bytes({"cut.img": data[: len(data) // 2]}), "truncated_image", "cut.img")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb_dimensions_checked_before_decoding():
    # IHDR claims 100000 x 100000; nothing of that size is ever allocated.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    bomb = (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )
    refused(zip_bytes({"a.png": png(), "bomb.png": bomb}), "too_many_pixels", "bomb.png")
    refused(zip_bytes({"big.png": png((64, 64))}), "too_many_pixels", "big.png", Limits(max_pixels=1000))


def test_tiny_images_against_min_side():
    refused(zip_bytes({"dot.png": encode(Image.new("L", (1, 1)), "PNG")}), "too_small", "dot.png")
    [img] = decode_forget_set(encode(Image.new("L", (1, 1)), "PNG"), Limits(min_side=1))
    assert (img.width, img.height) == (1, 1)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_are_refused(fmt):
    frames = [Image.new("RGB", (16, 16), (i * 80, 0, 0)) for i in range(3)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    refused(zip_bytes({"anim.img": data}), "animated_image", "anim.img")


def test_static_gif_is_not_an_accepted_format():
    refused(encode(Image.new("L", (16, 16)), "GIF"), "unsupported_format", "<upload>")
