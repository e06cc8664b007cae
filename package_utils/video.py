"""Frame sampling and decoding of videos, animated GIFs, single images and folders of images.

Frame indices are ``np.linspace(0, N - 1, n)`` truncated to int over the *real* frame count N (counted
from the container's packets, not the often-wrong header), the same indices as the references.

Frame N is always the N-th frame a sequential decode from the start puts out. Only the frames needed are
decoded: decoding stops after the last sampled frame. In containers that store true presentation times and
reliable key frames (MP4/MOV, Matroska/WebM) the reader also jumps to the key frame before a sampled frame
when that skips work and drops non-reference frames that are not sampled; it checks every jump (the first
frame after it must be that key frame, frames must come in increasing order) and decodes the rest from the
start when a check fails. Every other container (AVI, whose timestamps follow decode order and whose
"key frame" flags can mark P-frames; MPEG-PS/TS, FLV, ASF, GIF, ...) is decoded from the start and frames are
numbered as the decoder puts them out. Animated images (WebP, APNG; a GIF under any name) are videos.
"""
from __future__ import annotations

import bisect
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterator, Sequence

import cv2
import numpy as np

from package_utils.io_utils import IMAGE_EXTENSIONS, BadInputError, read_image, to_bgr8

log = logging.getLogger(__name__)

# PyAV container formats that hold a still image rather than a video
_IMAGE_FORMATS = ("png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "image2", "gif_pipe")
# Demuxers whose packet timestamps are presentation times and whose key-frame flags come from the stream's
# sync-sample index: seeking there lands on a decodable frame whose number is known.
_EXACT_SEEK_FORMATS = ("mov", "mp4", "matroska", "webm")
# File names whose containers (MP4/MOV, Matroska/WebM) describe their streams in the header.
_HEADER_DESCRIBED_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm")
# Pillow image formats that may hold several frames decoded as a video (GIF goes through PyAV like .gif files).
_ANIMATED_IMAGE_FORMATS = ("WEBP", "PNG")


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """Evenly spaced frame indices: all frames when the video is short, else linspace truncated to int."""
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    if num_frames <= 0 or total <= num_frames:
        return np.arange(total, dtype=np.int64)
    return np.linspace(0, total - 1, num_frames).astype(np.int64)


@dataclass
class MediaInfo:
    kind: str            # "video", "image" or "image_folder"
    frame_count: int     # real number of frames
    width: int
    height: int
    fps: float | None


class MediaReader:
    """Reads sampled frames (BGR uint8) from a video file, an image, or a folder of images.

    Raises BadInputError (naming the file) for missing, empty, corrupt or frameless inputs.

    An MP4/MOV/Matroska/WebM reader keeps the file it opened to count the frames open for its first read;
    ``close()`` (or ``with MediaReader(path) as reader:``) lets it go sooner than garbage collection does.
    """

    _container = None  # the probe's open container, until the first read takes it or close() closes it

    #: Seek when it skips more than this many frames. A seek in MP4 (an index look-up and a decoder flush) costs
    #: less than decoding one frame: on the shared 720p clip (key frames every 30, 32 of 289 frames sampled)
    #: seeking past the frames after a GOP's last sample decodes 253 frames instead of 289, ~10% less time.
    min_seek_gap = 1

    def __init__(self, path: str | os.PathLike, allow_image: bool = True, threads: int = 1):
        """
        Args:
            path: video file, image file, or folder of images (sorted by name).
            allow_image: accept still images (else they are a BadInputError "not a video").
            threads: decoder threads (frame threading when > 1); keep threads x workers <= cores.
        """
        self._container_lock = threading.Lock()
        self.path = Path(path)
        self.allow_image = allow_image
        self.threads = max(1, int(threads))
        self._pillow_animation = False  # animated WebP/PNG: FFmpeg's decoders read only their first frame
        if self.path.is_dir():
            self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self._files:
                raise BadInputError(f"{self.path}: folder holds no images")
            first = read_image(self._files[0])
            self.info = MediaInfo("image_folder", len(self._files), first.shape[1], first.shape[0], None)
            return
        if not self.path.is_file():
            raise BadInputError(f"{self.path}: no such file")
        if self.path.stat().st_size == 0:
            raise BadInputError(f"{self.path}: zero-byte file")
        if self.path.suffix.lower() in IMAGE_EXTENSIONS:
            animation = _animated_image_format(self.path)
            if animation == "GIF":  # a GIF under an image name: the video path reads it by content
                self._probe_video()
                return
            if animation is not None:
                self._probe_animated_image()
                return
            self._require_image_allowed("it is an image file")
            image = read_image(self.path)
            self._image = image
            self.info = MediaInfo("image", 1, image.shape[1], image.shape[0], None)
            return
        self._probe_video()

    def close(self) -> None:
        """Close the container kept from probing. A read in progress owns its container and closes it itself;
        a later read opens the file again."""
        container = self._take_kept_container()
        if container is not None:
            container.close()

    def __enter__(self) -> MediaReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: PyAV frees the container itself
            pass

    def _take_kept_container(self):
        """Hand over the kept container (or None) to exactly one user: a read, or close() from another thread."""
        lock = self.__dict__.get("_container_lock")
        if lock is None:  # __init__ failed before the lock existed: nothing was kept
            return None
        with lock:
            container, self._container = self._container, None
        return container

    def _require_image_allowed(self, why: str) -> None:
        if not self.allow_image:
            raise BadInputError(f"{self.path}: not a video ({why})")

    def _probe_video(self) -> None:
        import av

        # libav's own messages about corrupt streams go to stderr in bursts; our errors name the file instead
        av.logging.set_level(av.logging.PANIC)

        container, keep = None, False
        try:
            try:
                container = _open_container(self.path)
                if not container.streams.video:
                    raise BadInputError(f"{self.path}: no video stream")
                format_names = set(container.format.name.split(","))
                if format_names & set(_IMAGE_FORMATS) and container.format.name != "gif":
                    self._require_image_allowed(f"the file holds a still image ({container.format.name})")
                stream = container.streams.video[0]
                pts, keyframe_pts, first_is_keyframe = [], [], None
                for packet in container.demux(stream):
                    # Empty packets (demuxer flush, AVI drop markers) and packets an edit list discards put out
                    # no frame in a sequential decode, so they are not frames.
                    if packet.size == 0 or packet.is_discard:
                        continue
                    if first_is_keyframe is None:
                        first_is_keyframe = packet.is_keyframe
                    pts.append(packet.pts)
                    if packet.is_keyframe:
                        keyframe_pts.append(packet.pts)
                fps = float(stream.average_rate) if stream.average_rate else None
                width, height = stream.codec_context.width, stream.codec_context.height
            except BadInputError:
                raise
            except Exception as error:  # PyAV raises many error types for corrupt data
                raise BadInputError(f"{self.path}: cannot be decoded ({type(error).__name__}: {error})") from None
            if not pts:
                raise BadInputError(f"{self.path}: video has no frames")
            # Packet timestamps name frames only when they are unique presentation times and the first packet
            # (a key frame) is the first frame shown; elsewhere frames are numbered in decoder output order.
            self._exact_seek = (bool(format_names & set(_EXACT_SEEK_FORMATS)) and None not in pts
                                and len(set(pts)) == len(pts) and bool(first_is_keyframe) and pts[0] == min(pts))
            if self._exact_seek:
                self._sorted_pts = sorted(pts)
                self._pts_to_index = {p: i for i, p in enumerate(self._sorted_pts)}
                self._keyframe_indices = sorted(self._pts_to_index[p] for p in keyframe_pts)
                # An open costs 4 ms (14 with FFmpeg's stream probing, see _open_container) for a 720p H.264
                # clip: the first read reuses this container, going back to frame 0 with a checked seek. Its decoder was never opened (only packets were read),
                # so the read still sets its threads. Only formats that seek exactly keep it; others reopen.
                self._container, keep = container, True
        finally:
            if container is not None and not keep:
                container.close()
        self.info = MediaInfo("video", len(pts), width, height, fps)

    def _probe_animated_image(self) -> None:
        from PIL import Image

        try:
            with Image.open(self.path) as image:
                frame_count, (width, height) = int(image.n_frames), image.size
                image.load()  # the first frame's duration is known once it is decoded
                duration_ms = image.info.get("duration") or 0
        except Exception as error:  # Pillow raises many error types for corrupt data
            raise BadInputError(f"{self.path}: cannot be decoded ({type(error).__name__}: {error})") from None
        self._pillow_animation = True
        self.info = MediaInfo("video", frame_count, width, height, 1000.0 / duration_ms if duration_ms else None)

    def read(self, indices: Sequence[int], prefetch: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(index, frame)`` for the requested indices, in increasing order.

        A frame that cannot be decoded is logged and left out; the caller sees which indices arrived.
        With ``prefetch > 0`` a background thread decodes up to that many frames ahead, so decoding
        (which releases the GIL) overlaps the caller's work on the previous frame.
        """
        if prefetch > 0:
            yield from _prefetched(self._read(indices), prefetch)
        else:
            yield from self._read(indices)

    def _read(self, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        wanted = sorted({int(i) for i in indices if 0 <= int(i) < self.info.frame_count})
        if not wanted:
            return
        if self.info.kind == "image":
            yield 0, self._image
        elif self.info.kind == "image_folder":
            for index in wanted:
                try:
                    yield index, read_image(self._files[index])
                except BadInputError as error:
                    log.warning("%s", error)
        elif self._pillow_animation:
            yield from self._read_animated_image(wanted)
        elif self._exact_seek:
            remaining = yield from self._read_video_seeking(wanted)
            if remaining:
                yield from self._read_video_in_order(remaining)
        else:
            yield from self._read_video_in_order(wanted)

    def _read_video_seeking(self, wanted: list[int]) -> Generator[tuple[int, np.ndarray], None, list[int]]:
        """Decode with key-frame jumps. Returns the wanted indices after the last one delivered that a decode
        from the start must find: all of them when a jump cannot be trusted or decoding failed, none when the
        stream simply ended."""
        wanted_set = set(wanted)
        last_wanted = wanted[-1]
        position = -1  # index of the last frame that came out of the decoder
        delivered = -1
        try:
            # The probe's container stands where its demux ended; a fresh one stands at the first packet.
            container = self._take_kept_container()
            rewind = container is not None
            if container is None:
                container = _open_container(self.path)
            with container:
                stream = container.streams.video[0]
                codec = stream.codec_context
                # Frame threads copy skip_frame from this context per packet, so the NONREF toggling below holds.
                codec.thread_count = self.threads
                codec.thread_type = "AUTO" if self.threads > 1 else "SLICE"
                target_pos = 0
                while target_pos < len(wanted):
                    target = wanted[target_pos]
                    # Jump to the key frame before the target when decoding up to it would pass that key frame.
                    key_pos = bisect.bisect_right(self._keyframe_indices, target) - 1
                    keyframe = self._keyframe_indices[key_pos] if key_pos >= 0 else 0
                    expected_first = None  # after a jump, the first frame from the key frame on must be it
                    if keyframe - position > self.min_seek_gap:
                        container.seek(self._sorted_pts[keyframe], stream=stream, backward=True, any_frame=False)
                        expected_first = keyframe
                    elif rewind:  # decode from the start, as a fresh container would: frame 0 is a key frame
                        container.seek(self._sorted_pts[0], stream=stream, backward=True, any_frame=False)
                        expected_first = 0
                    rewind = False
                    reached = False
                    for packet in container.demux(stream):
                        # Non-reference frames that are not sampled are never needed by later frames.
                        needed = packet.pts is None or self._pts_to_index.get(packet.pts) in wanted_set
                        codec.skip_frame = "DEFAULT" if needed else "NONREF"
                        for frame in packet.decode():
                            index = self._pts_to_index.get(frame.pts)
                            if index is None or (expected_first is not None and index < expected_first):
                                continue  # leading frames of an open GOP before the key frame jumped to
                            if expected_first is not None:
                                # A jump must land on the key frame asked for, decoded as a key frame (a
                                # mislabelled sync sample decodes to garbage).
                                trusted = index == expected_first and bool(frame.key_frame)
                            else:
                                trusted = index > position
                            if not trusted:
                                log.info("%s: frame %d came out after frame %d (expected %s); decoding from the "
                                         "start instead", self.path, index, position, expected_first or "later")
                                return [i for i in wanted if i > delivered]
                            expected_first = None
                            position = index
                            if index in wanted_set:
                                wanted_set.discard(index)
                                delivered = index
                                yield index, to_bgr8(frame.to_ndarray(format="bgr24"), self.path)
                            if position >= target:
                                reached = True
                        if reached or position >= last_wanted:
                            break
                    while target_pos < len(wanted) and (wanted[target_pos] <= position or
                                                        wanted[target_pos] not in wanted_set):
                        target_pos += 1
                    if not reached:  # end of stream before the target: nothing more to find
                        break
        except Exception as error:
            log.warning("%s: decoding with jumps stopped (%s: %s); decoding from the start", self.path,
                        type(error).__name__, error)
            return [i for i in wanted if i > delivered]
        if wanted_set:
            log.warning("%s: %d sampled frames not in the decoded stream: %s", self.path, len(wanted_set),
                        sorted(wanted_set)[:10])
        return []

    def _read_video_in_order(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Decode from the start and number frames as the decoder puts them out (no seeking, no skipping).

        A packet the decoder rejects is logged and passed over, as a player would; its frame is not counted.
        """
        import av

        wanted_set, last_wanted = set(wanted), wanted[-1]
        index = -1
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.codec_context.thread_count = self.threads
                stream.codec_context.thread_type = "AUTO" if self.threads > 1 else "SLICE"
                rejected = 0
                for packet in container.demux(stream):
                    try:
                        frames = packet.decode()
                    except av.error.InvalidDataError:
                        rejected += 1
                        continue
                    for frame in frames:
                        index += 1
                        if index in wanted_set:
                            wanted_set.discard(index)
                            yield index, to_bgr8(frame.to_ndarray(format="bgr24"), self.path)
                        if index >= last_wanted:
                            return
                if rejected or index + 1 != self.info.frame_count:
                    log.warning("%s: the decoder put out %d frames from %d packets (%d rejected)", self.path,
                                index + 1, self.info.frame_count, rejected)
        except Exception as error:
            log.warning("%s: decoding stopped early (%s: %s)", self.path, type(error).__name__, error)
        if wanted_set:
            yield from self._read_with_opencv(sorted(wanted_set))

    def _read_animated_image(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Animated WebP/PNG frames, composed onto the canvas by Pillow, decoded in order."""
        from PIL import Image

        wanted_set = set(wanted)
        try:
            with Image.open(self.path) as image:
                for index in range(wanted[-1] + 1):
                    image.seek(index)
                    if index in wanted_set:
                        yield index, cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
        except Exception as error:  # Pillow raises many error types for corrupt data
            log.warning("%s: decoding stopped early (%s: %s)", self.path, type(error).__name__, error)

    def _read_with_opencv(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Sequential fallback for frames PyAV did not deliver (odd timestamps, broken key frames)."""
        capture = cv2.VideoCapture(str(self.path))
        try:
            index, wanted_set, last = 0, set(wanted), wanted[-1]
            while index <= last:
                if index in wanted_set:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    yield index, to_bgr8(frame, self.path)
                elif not capture.grab():
                    break
                index += 1
            missing = [i for i in wanted if i >= index]
            if missing:
                log.warning("%s: %d sampled frames could not be decoded: %s", self.path, len(missing), missing[:10])
        finally:
            capture.release()


def _animated_image_format(path: Path) -> str | None:
    """Pillow's format name when the image file holds several frames (e.g. "WEBP", "GIF"), else None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1 and image.format in _ANIMATED_IMAGE_FORMATS + ("GIF",):
                return image.format
    except Exception:  # not an image Pillow knows: the still-image reader names the problem
        return None
    return None


def _open_container(path: Path):
    """The file opened by PyAV. MP4/MOV and Matroska/WebM headers describe their video streams, so FFmpeg's
    stream probing (which decodes frames: ~10 of the ~14 ms an open of a 720p H.264 clip takes) is skipped for
    them when the header gives the frame size, pixel format and frame rate; other files, and these when their
    header does not, are opened with the full probing."""
    import av

    if path.suffix.lower() in _HEADER_DESCRIBED_SUFFIXES:
        try:
            container = av.open(str(path), container_options={"probesize": "32", "analyzeduration": "0"})
        except Exception:  # e.g. another container under this name: the full probing below tells
            return av.open(str(path))
        streams = container.streams.video
        context = streams[0].codec_context if streams else None
        if set(container.format.name.split(",")) & set(_EXACT_SEEK_FORMATS) and context is not None \
                and context.width and context.height and context.format is not None and streams[0].average_rate:
            return container
        container.close()
    return av.open(str(path))


_END = object()


def _prefetched(source: Iterator, depth: int) -> Iterator:
    """Run ``source`` in a daemon thread, handing items over through a bounded queue.

    Exceptions are re-raised in the consumer; a consumer that stops early stops the producer.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_END)
        except BaseException as error:  # handed to the consumer
            items.put(error)
        finally:
            # A consumer that stopped early leaves the source suspended: close it here, in the one thread that
            # runs it, so it closes its container now rather than whenever it is garbage-collected.
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="frame-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
