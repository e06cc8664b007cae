"""Frame sampling and decoding: indices, frame identity against sequential cv2 reads, counts, odd inputs."""
from __future__ import annotations

import os
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


# ------------------------------------------------------------------------------------------------ every container
# Frame N must be the N-th frame a sequential PyAV decode from the start puts out. The clips' frames carry their
# index as a 10-bit bar code (wide black/white cells, readable after lossy coding and GIF palettes).
BAR_BITS, BAR_WIDTH, BAR_HEIGHT = 10, 160, 96


def barcode_frame(index: int) -> np.ndarray:
    frame = np.full((BAR_HEIGHT, BAR_WIDTH, 3), 96, np.uint8)
    cell = BAR_WIDTH // BAR_BITS
    for bit in range(BAR_BITS):
        frame[:32, bit * cell:(bit + 1) * cell] = 255 if index >> bit & 1 else 0
    cv2.putText(frame, str(index), (8, BAR_HEIGHT - 16), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 2)
    return frame


def barcode_of(frame: np.ndarray) -> int:
    cell = frame.shape[1] // BAR_BITS
    grey = frame[8:24].mean(axis=2)
    return sum(1 << bit for bit in range(BAR_BITS) if grey[:, bit * cell + 3:(bit + 1) * cell - 3].mean() > 128)


def decode_sequentially(path: Path) -> list[np.ndarray]:
    """The reference: every frame of a PyAV decode from the start, in output order."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="bgr24") for frame in container.decode(container.streams.video[0])]


def encode_packets(codec: str, frames, options: dict, max_b_frames: int = 0, gop: int = 12) -> tuple[list, bytes]:
    """Encode BGR frames with a bare codec context: the packets in decode order and the codec's extradata."""
    from fractions import Fraction

    frames = list(frames)
    context = av.CodecContext.create(codec, "w")
    context.height, context.width = frames[0].shape[:2]
    context.pix_fmt, context.time_base, context.framerate = "yuv420p", Fraction(1, 25), Fraction(25)
    context.gop_size, context.max_b_frames, context.options = gop, max_b_frames, options
    packets = []
    for index, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24").reformat(format="yuv420p")
        frame.pts = index
        packets += context.encode(frame)
    packets += context.encode(None)
    return packets, context.extradata


def mux_packets(path: Path, codec: str, size: tuple[int, int], packets: list[tuple[bytes, int, int, bool]],
                extradata: bytes | None) -> Path:
    """Write (data, pts, dts, key frame) packets as they are into a container chosen by the file name."""
    from fractions import Fraction

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if extradata:
            stream.codec_context.extradata = extradata
        for data, pts, dts, key in packets:
            packet = av.Packet(data)
            packet.pts, packet.dts, packet.time_base, packet.is_keyframe = pts, dts, Fraction(1, 25), key
            packet.stream = stream
            container.mux(packet)
    return path


def _vop_type(data: bytes) -> str:
    start = data.find(b"\x00\x00\x01\xb6")  # MPEG-4 Part 2 VOP start code, then 2 bits of coding type
    return "IPBS"[data[start + 4] >> 6]


def _not_coded_vop(vop: bytes, time_bits: int) -> bytes:
    """An N-VOP (vop_coded = 0) with the header fields of ``vop``: what DivX stores after a packed B-frame."""
    start = vop.find(b"\x00\x00\x01\xb6")
    bits = "".join(f"{byte:08b}" for byte in vop[start + 4:start + 12])
    end = 2
    while bits[end] == "1":  # modulo_time_base
        end += 1
    end += 1 + 1 + time_bits + 1  # its closing 0, marker, vop_time_increment, marker
    header = "01" + bits[2:end] + "0"
    header += "0" + "1" * ((8 - (len(header) + 1) % 8) % 8)  # next_start_code stuffing
    return b"\x00\x00\x01\xb6" + int(header, 2).to_bytes(len(header) // 8, "big")


def packed_bframes_avi(path: Path, frames) -> Path:
    """MPEG-4 Part 2 in AVI stored as DivX 5 'packed bitstream': each P-VOP shares its packet with the B-VOP
    that follows it in decode order, and an N-VOP placeholder fills the B-frame's slot (the issue's film clip).
    AVI numbers packets in storage order, so timestamps say nothing about presentation order."""
    frames = list(frames)
    packets, extradata = encode_packets("mpeg4", frames, {"qscale": "3"}, max_b_frames=1, gop=12)
    data = [bytes(p) for p in packets]
    types = [_vop_type(d) for d in data]
    divx_tag = b"\x00\x00\x01\xb2DivX503b1393p"  # user data that tells decoders the stream is packed

    def tagged(blob: bytes) -> bytes:
        start = blob.find(b"\x00\x00\x01\xb2")
        end = blob.find(b"\x00\x00\x01", start + 4)
        return blob if start < 0 else blob[:start] + divx_tag + blob[end:]

    stored, i = [], 0
    while i < len(data):
        if types[i] in "IP" and i + 1 < len(data) and types[i + 1] == "B":
            # libavcodec's mpeg4 encoder at 25 fps codes vop_time_increment in 5 bits
            stored += [(tagged(data[i] + data[i + 1]), types[i] == "I"), (_not_coded_vop(data[i + 1], 5), False)]
            i += 2
        else:
            stored.append((tagged(data[i]), types[i] == "I"))
            i += 1
    assert "B" in types and len(stored) == len(frames)
    height, width = frames[0].shape[:2]
    return mux_packets(path, "mpeg4", (width, height),
                       [(blob, k, k, key) for k, (blob, key) in enumerate(stored)], extradata)


def encode_clip(path: Path, frames, codec: str, options: dict | None = None, max_b_frames: int | None = None,
                gop: int = 12) -> Path:
    """A clip encoded with exactly ``options`` (the containers table below)."""
    return encode_video(path, frames, codec, gop=gop, stream_options=options or {}, max_b_frames=max_b_frames)


def renamed(path: Path, suffix: str) -> Path:
    return path.rename(path.with_suffix(suffix))


def save_with_pillow(path: Path, frames, **options) -> Path:
    from PIL import Image

    images = [Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)) for frame in frames]
    images[0].save(path, save_all=len(images) > 1, append_images=images[1:], duration=40, loop=0, **options)
    return path


X264_BFRAMES = {"crf": "12", "preset": "veryfast",
                "x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=3:b-pyramid=normal"}
X264_NO_BFRAMES = {"crf": "12", "preset": "veryfast", "x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=0"}
X264_OPEN_GOP = {"crf": "12", "preset": "veryfast",
                 "x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=3:open-gop=1"}
CONTAINERS = {
    "mp4-h264-bframes": lambda path, frames: encode_clip(path.with_suffix(".mp4"), frames, "libx264", X264_BFRAMES),
    "mp4-h264-no-bframes": lambda path, frames: encode_clip(path.with_suffix(".mp4"), frames, "libx264",
                                                            X264_NO_BFRAMES),
    "mp4-h264-open-gop": lambda path, frames: encode_clip(path.with_suffix(".mp4"), frames, "libx264", X264_OPEN_GOP),
    "mov-h264-bframes": lambda path, frames: encode_clip(path.with_suffix(".mov"), frames, "libx264", X264_BFRAMES),
    "mkv-h264-bframes": lambda path, frames: encode_clip(path.with_suffix(".mkv"), frames, "libx264", X264_BFRAMES),
    "avi-h264-bframes": lambda path, frames: encode_clip(path.with_suffix(".avi"), frames, "libx264", X264_BFRAMES),
    "avi-mpeg4-bframes": lambda path, frames: encode_clip(path.with_suffix(".avi"), frames, "mpeg4",
                                                          {"qscale": "3"}, max_b_frames=2),
    # an I-frame every third frame with two B-frames shown before it, as at the scene cuts of a film rip
    "avi-mpeg4-bframes-scene-cuts": lambda path, frames: encode_clip(path.with_suffix(".avi"), frames, "mpeg4",
                                                                     {"qscale": "3"}, max_b_frames=2, gop=3),
    "avi-mpeg4-packed": lambda path, frames: packed_bframes_avi(path.with_suffix(".avi"), frames),
    "mp4-mpeg4-bframes": lambda path, frames: encode_clip(path.with_suffix(".mp4"), frames, "mpeg4",
                                                          {"qscale": "3"}, max_b_frames=2),
    "webm-vp8": lambda path, frames: encode_clip(path.with_suffix(".webm"), frames, "libvpx",
                                                 {"crf": "8", "b": "2M"}),
    "webm-vp9": lambda path, frames: encode_clip(path.with_suffix(".webm"), frames, "libvpx-vp9",
                                                 {"crf": "20", "b": "0", "cpu-used": "8", "deadline": "realtime"}),
    "gif": lambda path, frames: save_with_pillow(path.with_suffix(".gif"), frames),
    # named as containers whose header describes their streams, but another container inside
    "mpegts-h264-named-mp4": lambda path, frames: renamed(
        encode_clip(path.with_suffix(".ts"), frames, "libx264", X264_BFRAMES), ".mp4"),
    "avi-mpeg4-named-mkv": lambda path, frames: renamed(
        encode_clip(path.with_suffix(".avi"), frames, "mpeg4", {"qscale": "3"}, max_b_frames=2), ".mkv"),
}
CLIP_FRAMES = 60
CLIP_INDEX_SETS = [sample_indices(CLIP_FRAMES, 8), sample_indices(CLIP_FRAMES, 31), [5, 30], [59], [13, 14, 15, 40],
                   [1, 2, 25, 26, 58], list(range(CLIP_FRAMES))]


@pytest.fixture(scope="module", params=sorted(CONTAINERS))
def container_clip(request, tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A 60-frame bar-coded clip in one container, with its sequential PyAV decode."""
    path = CONTAINERS[request.param](tmp_path_factory.mktemp(request.param) / "clip",
                                     (barcode_frame(i) for i in range(CLIP_FRAMES)))
    reference = decode_sequentially(path)
    assert [barcode_of(frame) for frame in reference] == list(range(CLIP_FRAMES)), "the clip itself is broken"
    return path, reference


@pytest.mark.parametrize("seek_gap", [0, 16], ids=["always-seek", "default"])
def test_every_container_gives_the_sequential_frames(container_clip, seek_gap: int) -> None:
    path, reference = container_clip
    reader = MediaReader(path, allow_image=False)
    reader.min_seek_gap = seek_gap
    assert (reader.info.kind, reader.info.frame_count) == ("video", CLIP_FRAMES)
    for indices in CLIP_INDEX_SETS:
        got = list(reader.read(indices))
        assert [index for index, _ in got] == sorted(set(int(i) for i in indices)), "not all, or not in order"
        for index, frame in got:
            assert np.array_equal(frame, reference[index]), f"{path.name}: frame {index} is not the sequential one"


def test_a_quick_open_that_fails_falls_back_to_full_probing(h264_video: Path, monkeypatch) -> None:
    """An MP4 the header-only open cannot take is opened with FFmpeg's full probing: same count, same frames."""
    reference = decode_sequentially(h264_video)
    real_open, quick_opens = av.open, []

    def refusing_quick_open(*args, **kwargs):
        if kwargs.get("container_options"):
            quick_opens.append(args[0])
            raise av.error.InvalidDataError(1094995529, "refused for the test")
        return real_open(*args, **kwargs)
    monkeypatch.setattr(av, "open", refusing_quick_open)
    reader = MediaReader(h264_video, allow_image=False)
    assert reader.info.frame_count == len(reference)
    got = dict(reader.read([0, 7, len(reference) - 1]))
    assert quick_opens and all(np.array_equal(frame, reference[index]) for index, frame in got.items())
    assert sorted(got) == [0, 7, len(reference) - 1]


def test_reading_twice_gives_the_same_frames(container_clip) -> None:
    """The first read may reuse the container the frame count was taken from (prefetched here, as the crop stage
    reads); a second read of the same reader must give the same frames."""
    path, reference = container_clip
    reader = MediaReader(path, allow_image=False)
    indices = sorted(set(sample_indices(CLIP_FRAMES, 8).tolist()) | {13, 14})
    first = list(reader.read(indices, prefetch=2))
    second = list(reader.read(indices))
    assert [i for i, _ in first] == [i for i, _ in second] == indices
    for (index, frame), (_, again) in zip(first, second):
        assert np.array_equal(frame, reference[index]) and np.array_equal(again, frame), f"{path.name}: {index}"


def test_mp4_is_opened_once_for_the_first_read(h264_video: Path, monkeypatch) -> None:
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: opened.append(args[0]) or real_open(*args, **kwargs))
    for seek_gap, indices in [(1, [0, 13, 47]), (10**6, [0, 13, 47]), (1, [13, 47]), (0, [5])]:
        opened.clear()
        reader = MediaReader(h264_video)
        reader.min_seek_gap = seek_gap
        got = dict(reader.read(indices))
        assert opened == [str(h264_video)], f"gap {seek_gap}, {indices}: opened {len(opened)} times"
        assert_same_frames(got, read_sequentially(h264_video, indices), indices)


def _descriptors_open_on(path: Path) -> int:
    target, count = str(path.resolve()), 0
    for entry in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(entry) == target
        except OSError:  # closed while listing
            pass
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")
def test_readers_leave_no_file_open(tmp_path: Path, h264_video: Path) -> None:
    """The container a reader keeps for its first read is closed when the read ends, when the caller stops
    early (also with prefetching), on close() / leaving a with block, and when an unread reader goes away."""
    reader = MediaReader(h264_video)
    assert _descriptors_open_on(h264_video) == 1  # kept for the first read
    assert len(list(reader.read([0, 30]))) == 2
    assert _descriptors_open_on(h264_video) == 0
    for prefetch in (0, 2):
        frames = MediaReader(h264_video).read([0, 20, 40], prefetch=prefetch)
        next(frames)
        frames.close()
        assert _descriptors_open_on(h264_video) == 0, f"prefetch={prefetch}"
    with MediaReader(h264_video) as reader:
        assert reader.info.frame_count == 48
    assert _descriptors_open_on(h264_video) == 0
    reader = MediaReader(h264_video)
    reader.close()
    assert _descriptors_open_on(h264_video) == 0
    assert len(list(reader.read([47]))) == 1  # a closed reader opens the file again
    MediaReader(h264_video)  # unread and dropped
    assert _descriptors_open_on(h264_video) == 0
    # a read that fails part-way (data cut after a complete index) closes what it opened
    full = encode_video(tmp_path / "full.mp4", (numbered_frame(i) for i in range(48)),
                        container_options={"movflags": "faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert 0 < len(list(MediaReader(cut).read(sample_indices(48, 8)))) < 8
    assert _descriptors_open_on(cut) == 0
    avi = encode_video(tmp_path / "clip.avi", (numbered_frame(i) for i in range(24)))
    reader = MediaReader(avi)
    assert _descriptors_open_on(avi) == 0  # decoded from the start anyway: nothing kept


def test_packed_bframes_avi_really_is_packed(tmp_path: Path) -> None:
    """The packed fixture stores two VOPs in some packets and its timestamps are not presentation times."""
    path = packed_bframes_avi(tmp_path / "packed.avi", (barcode_frame(i) for i in range(24)))
    with av.open(str(path)) as container:
        packets = [bytes(p) for p in container.demux(video=0) if p.size]
    assert len(packets) == 24
    assert sum(p.count(b"\x00\x00\x01\xb6") == 2 for p in packets) >= 5
    with av.open(str(path)) as container:
        output_pts = [frame.pts for frame in container.decode(video=0)]
    assert output_pts != sorted(output_pts)


def test_mislabelled_key_frames_fall_back_to_sequential(tmp_path: Path, caplog) -> None:
    """Sync samples that are really P-frames decode to garbage after a jump: the reader notices and decodes
    from the start instead of returning those frames."""
    frames = [barcode_frame(i) for i in range(48)]
    packets, extradata = encode_packets("mpeg4", frames, {"qscale": "3"}, gop=24)
    path = mux_packets(tmp_path / "mislabelled.mp4", "mpeg4", (BAR_WIDTH, BAR_HEIGHT),
                       [(bytes(p), p.pts, p.dts, p.is_keyframe or k % 6 == 0) for k, p in enumerate(packets)],
                       extradata)
    reference = decode_sequentially(path)
    reader = MediaReader(path)
    assert reader._keyframe_indices == list(range(0, 48, 6))
    reader.min_seek_gap = 0
    with caplog.at_level("INFO", logger="package_utils.video"):
        got = list(reader.read([7, 30, 47]))
    assert [i for i, _ in got] == [7, 30, 47]
    assert all(np.array_equal(frame, reference[i]) for i, frame in got)
    assert "decoding from the start" in caplog.text


def test_avi_is_decoded_in_output_order(tmp_path: Path) -> None:
    """AVI timestamps follow storage order: the reader never seeks there."""
    path = encode_clip(tmp_path / "clip.avi", (barcode_frame(i) for i in range(24)), "mpeg4", {"qscale": "3"},
                       max_b_frames=2)
    assert MediaReader(path)._exact_seek is False


@pytest.mark.parametrize("codec, suffix", [("mpeg4", ".avi"), ("libvpx", ".webm"), ("libx264", ".mkv")])
def test_real_clip_transcoded_gives_the_sequential_frames(tmp_path: Path, media_dir: Path, codec: str,
                                                          suffix: str) -> None:
    """A real film clip (Hamilton stage clip, 48 frames at half size) in other containers, B-frames where the
    codec has them, and DivX packed B-frames in AVI."""
    with av.open(str(media_dir / HAMILTON)) as container:
        frames = [cv2.resize(frame.to_ndarray(format="bgr24"), (320, 180))
                  for frame, _ in zip(container.decode(video=0), range(48))]
    options = {"mpeg4": {"qscale": "4"}, "libvpx": {"crf": "20", "b": "1M"}, "libx264": X264_BFRAMES}[codec]
    max_b_frames = 2 if codec == "mpeg4" else None
    clips = [encode_clip(tmp_path / f"clip{suffix}", frames, codec, options, max_b_frames=max_b_frames)]
    if codec == "mpeg4":
        clips.append(packed_bframes_avi(tmp_path / "packed.avi", frames))
    for path in clips:
        reference = decode_sequentially(path)
        reader = MediaReader(path)
        assert reader.info.frame_count == len(reference) == 48
        for seek_gap in (0, 16):
            reader.min_seek_gap = seek_gap
            indices = sorted(set(sample_indices(48, 31).tolist()) | {1, 2})
            got = list(reader.read(indices))
            assert [i for i, _ in got] == indices
            assert all(np.array_equal(frame, reference[i]) for i, frame in got)


# ------------------------------------------------------------------------------------------------ animated images
SBER_WEBP = "fakes/sber-swap/elon.webp"


def pillow_frames(path: Path) -> list[np.ndarray]:
    """The reference for animated images FFmpeg cannot decode: Pillow's frames in order."""
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        return [cv2.cvtColor(np.asarray(frame.convert("RGB")), cv2.COLOR_RGB2BGR)
                for frame in ImageSequence.Iterator(image)]


def test_animated_webp_is_a_video(media_dir: Path, manifest) -> None:
    path = media_dir / SBER_WEBP
    reader = MediaReader(path, allow_image=False)
    assert (reader.info.kind, reader.info.frame_count) == ("video", int(manifest[SBER_WEBP]["frames"])) == ("video", 66)
    assert (reader.info.width, reader.info.height) == (464, 560)
    reference = pillow_frames(path)
    indices = sample_indices(66, 8)
    got = dict(reader.read(indices))
    assert sorted(got) == indices.tolist()
    assert all(np.array_equal(got[i], reference[i]) for i in got)
    assert np.abs(got[0].astype(int) - got[65]).mean() > 1.0, "the frames are one still image"


@pytest.mark.parametrize("suffix", [".webp", ".png"], ids=["webp", "apng"])
def test_animated_images_frames_are_numbered(tmp_path: Path, suffix: str) -> None:
    path = save_with_pillow(tmp_path / f"clip{suffix}", [barcode_frame(i) for i in range(30)],
                            **({"quality": 90} if suffix == ".webp" else {}))
    reader = MediaReader(path)
    assert (reader.info.kind, reader.info.frame_count) == ("video", 30)
    assert reader.info.fps == pytest.approx(25.0)
    assert [(i, barcode_of(f)) for i, f in reader.read([0, 7, 29])] == [(0, 0), (7, 7), (29, 29)]


def test_gif_named_webp_is_a_video(tmp_path: Path) -> None:
    """A 53-frame GIF under a .webp name is read by its content, all frames."""
    frames = [barcode_frame(i) for i in range(53)]
    path = save_with_pillow(tmp_path / "clip.gif", frames).rename(tmp_path / "clip.webp")
    reader = MediaReader(path, allow_image=False)
    assert (reader.info.kind, reader.info.frame_count) == ("video", 53)
    reference = decode_sequentially(path)
    got = list(reader.read(sample_indices(53, 8)))
    assert [(i, barcode_of(f)) for i, f in got] == [(i, i) for i in sample_indices(53, 8).tolist()]
    assert all(np.array_equal(frame, reference[i]) for i, frame in got)


@pytest.mark.parametrize("suffix", [".webp", ".png"])
def test_still_webp_and_png_stay_images(tmp_path: Path, media_dir: Path, suffix: str) -> None:
    photo = cv2.imread(str(media_dir / "photos/face_recognition/obama_small.jpg"))
    path = tmp_path / f"still{suffix}"
    cv2.imwrite(str(path), photo)
    reader = MediaReader(path)
    assert (reader.info.kind, reader.info.frame_count) == ("image", 1)
    with pytest.raises(BadInputError, match="not a video"):
        MediaReader(path, allow_image=False)
