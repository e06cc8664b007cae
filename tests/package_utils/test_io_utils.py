"""io_utils: file modes, path checks, the output lock, clear disk errors."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from package_utils.io_utils import (BadInputError, OutputBusyError, atomic_write_text, check_writable,
                                    explain_os_error, inside, output_file_lock, output_lock, safe_name,
                                    safe_relative)


def test_atomic_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("bad", ["..", "../x", "a/../b", "/etc/passwd", "", None, 3, "a\0b"])
def test_names_from_user_data_cannot_leave_their_folder(bad):
    with pytest.raises(BadInputError):
        safe_relative(bad, "image_path", "meta.json")
    with pytest.raises(BadInputError):
        safe_name(bad, "method")


def test_plain_names_and_relative_paths_pass(tmp_path):
    assert safe_name("000_003", "name") == "000_003"
    assert safe_relative("frames/real/a.png", "image_path") == "frames/real/a.png"
    assert inside(tmp_path / "a" / "b", tmp_path) == (tmp_path / "a" / "b").resolve()
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(BadInputError, match="leaves"):
        inside(tmp_path / "link" / "etc", tmp_path)


def test_second_writer_is_refused_and_a_killed_holder_frees_the_lock(tmp_path):
    with output_lock(tmp_path):
        with pytest.raises(OutputBusyError, match=str(tmp_path)):
            with output_lock(tmp_path):
                pass
    # a holder killed with SIGKILL leaves no stale lock
    script = textwrap.dedent(f"""
        import os, signal
        from package_utils.io_utils import output_lock
        with output_lock({str(tmp_path)!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    with output_lock(tmp_path):
        pass


def test_file_lock_refuses_a_second_writer_of_that_file_only(tmp_path):
    with output_file_lock(tmp_path / "train.json", "metadata file"):
        with output_file_lock(tmp_path / "val.json", "metadata file"):  # another file of the folder: fine
            pass
        with pytest.raises(OutputBusyError, match=f"{tmp_path / 'train.json'}: another run .* metadata file"):
            with output_file_lock(tmp_path / "train.json", "metadata file"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.json.lock", ".val.json.lock"]


@pytest.mark.parametrize("code, message", [(errno.EROFS, "not writable"), (errno.EACCES, "not writable"),
                                           (errno.ENOSPC, "no space left on device")])
def test_unwritable_output_is_found_before_any_work(tmp_path, monkeypatch, code, message):
    # tests run as root here, where permissions do not bite: the kernel's answer is simulated instead
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("package_utils.io_utils.tempfile.mkstemp", refuse)
    with pytest.raises(OSError, match=message) as caught:
        check_writable(tmp_path / "out")
    assert str(tmp_path / "out") in str(caught.value)


def test_full_disk_error_says_so():
    error = explain_os_error(OSError(errno.ENOSPC, "No space left on device"), "/x/a.pth")
    assert "no space left on device" in str(error) and "/x/a.pth" in str(error)


def test_images_are_written_losslessly_with_the_fast_png_writer(tmp_path, media_dir):
    """Our PNG writer (up filter, zlib-ng Huffman coding) gives the pixels back to OpenCV and Pillow (which also
    checks every chunk's CRC), for colour and grey, odd sizes and strided views; images it does not take
    (alpha, 16-bit) go through OpenCV, and an explicit ``params`` still overrides the default."""
    import io

    import cv2
    import numpy as np
    from PIL import Image

    from package_utils.io_utils import atomic_write_image, encode_png, read_image, write_image

    face = read_image(media_dir / "photos/face_recognition/obama.jpg")[:320, :320]
    grey = cv2.cvtColor(face, cv2.COLOR_BGR2GRAY)
    for image in (face, grey, face[:1, :1], grey[:3, :5], face[::2, 1::3], np.zeros((7, 9, 3), np.uint8)):
        encoded = write_image(tmp_path / "crop.png", image)
        assert encoded == encode_png(image) and (tmp_path / "crop.png").read_bytes() == encoded
        assert np.array_equal(cv2.imread(str(tmp_path / "crop.png"), cv2.IMREAD_UNCHANGED), image)
        with Image.open(io.BytesIO(encoded)) as checked:
            checked.verify()
        with Image.open(io.BytesIO(encoded)) as opened:
            pixels = np.asarray(opened)
        assert np.array_equal(pixels if pixels.ndim == 2 else pixels[:, :, ::-1], image)
        atomic_write_image(tmp_path / "atomic.png", image)
        assert (tmp_path / "atomic.png").read_bytes() == encoded
    for other in (cv2.cvtColor(face, cv2.COLOR_BGR2BGRA), grey.astype(np.uint16) * 257):
        assert encode_png(other) is None
        write_image(tmp_path / "other.png", other)
        assert np.array_equal(cv2.imread(str(tmp_path / "other.png"), cv2.IMREAD_UNCHANGED), other)
    fast = len(encode_png(grey))
    write_image(tmp_path / "small.png", grey, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert (tmp_path / "small.png").stat().st_size < fast  # the caller's settings were used
