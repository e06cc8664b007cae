"""Frame sampling and decoding: indices, frame identity against sequential cv2 reads, counts, odd inputs."""
from __future__ import annotations

import shutil
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import encode_video, frame_index_of, numbered_frame, read_sequentially
from package_utils.io_utils import BadInputError
from package_utils.video import MediaReader, sample_indices

HAMILTON = "videos/face_recognition/short_hamilton_clip.mp4"
GIF = "videos/dlib/elon-musk-smoke.gif"


def assert_same_frames(got: dict[int, np.ndarray], expected: dict[int, np.ndarray], indices) -> None:
    assert sorted(got) == sorted(set(int(i) for i in indices))
    for index in got:
        assert got[index].shape == expected[index].shape and got[index].dtype == np.uint8
        assert np.array_equal(got[index], expected[index]), f"frame {index} differs from the sequential read"


# ------------------------------------------------------------------------------------------------ indices
@pytest.mark.parametrize("total, count", [(275, 32), (66, 4), (35, 8), (300, 32), (33, 32)])
def test_indices_are_truncated_linspace(total: int, count: int) -> None:
    expected = np.linspace(0, total - 1, count).astype(int)
    assert np.array_equal(sample_indices(total, count), expected)


def test_indices_known_values() -> None:
    """Truncation, not rounding: linspace(0, 65, 4) = 0, 21.67, 43.33, 65."""
    assert sample_indices(66, 4).tolist() == [0, 21, 43, 65]


@pytest.mark.parametrize("total", [1, 5, 32])
def test_short_video_gives_all_frames(total: int) -> None:
    assert sample_indices(total, 32).tolist() == list(range(total))


def test_no_frames_gives_no_indices() -> None:
    assert sample_indices(0, 4).size == 0


# ------------------------------------------------------------------------------------------------ H.264 identity
def test_numbered_video_has_bframes_and_gop(h264_video: Path) -> None:
    """The fixture really exercises seeking and frame skipping: key frames every 12, reordered B-frames."""
    with av.open(str(h264_video)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    pts = [p.pts for p in packets]
    keyframes = sorted(sorted(pts).index(p.pts) for p in packets if p.is_keyframe)
    assert len(packets) == 48
    assert keyframes == [0, 12, 24, 36]
    assert pts != sorted(pts), "no B-frames: decode order equals presentation order"


def test_sequential_read_is_the_numbered_frames(h264_video: Path) -> None:
    frames = read_sequentially(h264_video)
    assert [frame_index_of(frames[i], 48) for i in range(48)] == list(range(48))


INDEX_SETS = [sample_indices(48, 4), sample_indices(48, 8), [47], [0, 47], [13, 14, 15, 40], [5, 30],
              [1, 2, 25, 26, 46], list(range(48))]


@pytest.mark.parametrize("seek_gap", [0, 16, 10**6], ids=["always-seek", "default", "never-seek"])
@pytest.mark.parametrize("indices", INDEX_SETS, ids=lambda i: ",".join(map(str, list(i)[:6])))
def test_h264_sampled_frames_equal_sequential(h264_video: Path, indices, seek_gap: int) -> None:
    reader = MediaReader(h264_video)
    reader.min_seek_gap = seek_gap
    got = dict(reader.read(indices))
    assert_same_frames(got, read_sequentially(h264_video, indices), indices)
    assert {i: frame_index_of(f, 48) for i, f in got.items()} == {i: i for i in got}


def test_avi_with_bframes_keeps_frame_identity(tmp_path: Path) -> None:
    """AVI stamps packets in decode order; with B-frames the stamps must not be taken as frame numbers."""
    path = encode_video(tmp_path / "numbered.avi", (numbered_frame(i) for i in range(48)))
    reader = MediaReader(path)
    assert reader.info.frame_count == 48
    indices = [0, 5, 13, 30, 46, 47]
    got = dict(reader.read(indices))
    assert_same_frames(got, read_sequentially(path, indices), indices)
    assert {i: frame_index_of(f, 48) for i, f in got.items()} == {i: i for i in indices}


def test_frames_come_in_increasing_order(h264_video: Path) -> None:
    order = [i for i, _ in MediaReader(h264_video).read([40, 3, 22, 3, 99, -1])]
    assert order == [3, 22, 40]


# ------------------------------------------------------------------------------------------------ shared media
def test_shared_video_sampled_frames_equal_sequential(media_dir: Path) -> None:
    path = media_dir / HAMILTON
    reader = MediaReader(path)
    indices = sorted(set(sample_indices(reader.info.frame_count, 8).tolist()) | {1, 2, 150, 151})
    assert_same_frames(dict(reader.read(indices)), read_sequentially(path, indices), indices)


@pytest.mark.parametrize("rel", [HAMILTON, GIF, "fakes/sber-swap/dance.mp4",
                                 "videos/dlib/MOT20-05-raw_even_shorter.mp4"])
def test_frame_count_is_real_count(media_dir: Path, manifest, rel: str) -> None:
    info = MediaReader(media_dir / rel).info
    assert info.kind == "video"
    assert info.frame_count == int(manifest[rel]["frames"])
    assert (info.width, info.height) == (int(manifest[rel]["width"]), int(manifest[rel]["height"]))


def test_frame_count_without_header_count(tmp_path: Path) -> None:
    """Matroska stores no frame count in its header; the count comes from the packets."""
    path = encode_video(tmp_path / "numbered.mkv", (numbered_frame(i) for i in range(48)))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert MediaReader(path).info.frame_count == 48 == len(read_sequentially(path))


def test_gif_frames_equal_sequential(media_dir: Path) -> None:
    path = media_dir / GIF
    reader = MediaReader(path)
    assert reader.info.frame_count == 35
    indices = sample_indices(35, 8)
    assert_same_frames(dict(reader.read(indices)), read_sequentially(path, indices), indices)


def test_one_frame_video(tmp_path: Path) -> None:
    path = encode_video(tmp_path / "one.mp4", [numbered_frame(7)])
    reader = MediaReader(path, allow_image=False)
    assert reader.info.kind == "video" and reader.info.frame_count == 1
    indices = sample_indices(reader.info.frame_count, 4)
    assert indices.tolist() == [0]
    got = dict(reader.read(indices))
    assert_same_frames(got, read_sequentially(path), [0])
    assert frame_index_of(got[0], 48) == 7


def test_image_is_one_frame(media_dir: Path) -> None:
    reader = MediaReader(media_dir / "photos/face_recognition/obama.jpg")
    assert (reader.info.kind, reader.info.frame_count) == ("image", 1)
    [(index, frame)] = list(reader.read([0, 1, 2]))
    assert index == 0 and np.array_equal(frame, cv2.imread(str(media_dir / "photos/face_recognition/obama.jpg")))


def test_image_folder_is_a_sequence(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), numbered_frame(i))
    (tmp_path / "notes.txt").write_text("not an image")
    reader = MediaReader(tmp_path)
    assert (reader.info.kind, reader.info.frame_count) == ("image_folder", 3)
    assert [(i, frame_index_of(f, 48)) for i, f in reader.read([0, 1, 2])] == [(0, 0), (1, 1), (2, 2)]


# ------------------------------------------------------------------------------------------------ bad inputs
def test_missing_and_empty_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="gone.mp4: no such file"):
        MediaReader(tmp_path / "gone.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty.mp4: zero-byte file"):
        MediaReader(tmp_path / "empty.mp4")


def test_truncated_mp4_is_a_clear_error(tmp_path: Path, h264_video: Path) -> None:
    """MP4 written without faststart keeps its index at the end: half a file cannot be opened."""
    data = h264_video.read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="half.mp4: cannot be decoded"):
        MediaReader(tmp_path / "half.mp4")


def test_truncated_faststart_mp4_gives_the_frames_it_has(tmp_path: Path) -> None:
    """Index first, data cut: decoding stops early, the frames that come are the right ones."""
    full = encode_video(tmp_path / "full.mp4", (numbered_frame(i) for i in range(48)),
                        container_options={"movflags": "faststart"})
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    reader = MediaReader(cut)
    indices = sample_indices(48, 8)
    got = dict(reader.read(indices))
    assert 0 < len(got) < len(indices)
    assert set(got) <= set(indices.tolist())
    assert all(frame_index_of(frame, 48) == index for index, frame in got.items())


@pytest.mark.parametrize("photo", ["photos/face_recognition/alex-lacamoire.png", "photos/face_recognition/obama.jpg"])
def test_image_renamed_to_video(tmp_path: Path, media_dir: Path, photo: str) -> None:
    """A still image with a video extension is refused where a video is required, read as one frame otherwise."""
    fake = tmp_path / "still.mp4"
    shutil.copy(media_dir / photo, fake)
    with pytest.raises(BadInputError, match="still.mp4: not a video"):
        MediaReader(fake, allow_image=False)
    reader = MediaReader(fake, allow_image=True)
    assert reader.info.frame_count == 1
    [(index, frame)] = list(reader.read([0]))
    expected = cv2.imread(str(media_dir / photo))
    assert index == 0 and frame.shape == expected.shape
    assert np.abs(frame.astype(int) - expected).mean() < 2.0  # libav's and OpenCV's JPEG decoders may differ by 1


def test_text_file_renamed_to_video(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(BadInputError, match="notes.mp4"):
        MediaReader(path)
