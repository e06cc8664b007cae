"""Frame sampling and decoding of videos, animated GIFs, single images and folders of images.

Frame indices are ``np.linspace(0, N - 1, n)`` truncated to int over the *real* frame count N (counted
from the container's packets, not the often-wrong header), the same indices as the references. Only
the frames needed are decoded: decoding stops after the last sampled frame, jumps to the key frame
before a sampled frame when that skips work, and drops non-reference frames that are not sampled. Containers
whose timestamps follow decode order (AVI with B-frames) are decoded from the start and numbered in output order.
"""
from __future__ import annotations

import bisect
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from package_utils.io_utils import IMAGE_EXTENSIONS, BadInputError, read_image, to_bgr8

log = logging.getLogger(__name__)

# PyAV container formats that hold a still image rather than a video
_IMAGE_FORMATS = ("png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "image2", "gif_pipe")


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
    """

    #: Seek only when it skips at least this many frames: a seek costs about as much as decoding a few.
    min_seek_gap = 16

    def __init__(self, path: str | os.PathLike, allow_image: bool = True, threads: int = 1):
        """
        Args:
            path: video file, image file, or folder of images (sorted by name).
            allow_image: accept still images (else they are a BadInputError "not a video").
            threads: decoder threads (frame threading when > 1); keep threads x workers <= cores.
        """
        self.path = Path(path)
        self.allow_image = allow_image
        self.threads = max(1, int(threads))
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
            self._require_image_allowed("it is an image file")
            image = read_image(self.path)
            self._image = image
            self.info = MediaInfo("image", 1, image.shape[1], image.shape[0], None)
            return
        self._probe_video()

    def _require_image_allowed(self, why: str) -> None:
        if not self.allow_image:
            raise BadInputError(f"{self.path}: not a video ({why})")

    def _probe_video(self) -> None:
        import av

        # libav's own messages about corrupt streams go to stderr in bursts; our errors name the file instead
        av.logging.set_level(av.logging.PANIC)

        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise BadInputError(f"{self.path}: no video stream")
                format_names = set(container.format.name.split(","))
                if format_names & set(_IMAGE_FORMATS) and container.format.name != "gif":
                    self._require_image_allowed(f"the file holds a still image ({container.format.name})")
                stream = container.streams.video[0]
                pts, keyframe_pts = [], []
                for packet in container.demux(stream):
                    if packet.size == 0 or packet.pts is None:
                        continue
                    pts.append(packet.pts)
                    if packet.is_keyframe:
                        keyframe_pts.append(packet.pts)
                fps = float(stream.average_rate) if stream.average_rate else None
                width, height = stream.codec_context.width, stream.codec_context.height
                may_reorder = bool(stream.codec_context.has_b_frames) or "avi" in format_names
        except BadInputError:
            raise
        except Exception as error:  # PyAV raises many error types for corrupt data
            raise BadInputError(f"{self.path}: cannot be decoded ({type(error).__name__}: {error})") from None
        if not pts:
            raise BadInputError(f"{self.path}: video has no frames")
        # Packet timestamps identify frames only when they are unique presentation times. Containers such as
        # AVI stamp packets in decode order, so with B-frames a timestamp names the wrong frame: when the
        # stamps repeat, or never go back although frames may be reordered, frames are counted in decoder
        # output order. Streams without reordering (no B-frames) keep exact seeking.
        monotonic = all(a < b for a, b in zip(pts, pts[1:]))
        self._by_output_order = len(set(pts)) != len(pts) or (monotonic and may_reorder)
        self._sorted_pts = sorted(pts)
        self._pts_to_index = {p: i for i, p in enumerate(self._sorted_pts)}
        self._keyframe_indices = sorted(self._pts_to_index[p] for p in keyframe_pts)
        self.info = MediaInfo("video", len(pts), width, height, fps)

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
        else:
            yield from self._read_video(wanted)

    def _read_video(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        if self._by_output_order:
            yield from self._read_video_in_order(wanted)
            return
        import av

        wanted_set = set(wanted)
        last_wanted = wanted[-1]
        position = -1  # index of the last frame that came out of the decoder
        try:
            with av.open(str(self.path)) as container:
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
                    if keyframe - position > self.min_seek_gap:
                        container.seek(self._sorted_pts[keyframe], stream=stream, backward=True, any_frame=False)
                    reached = False
                    for packet in container.demux(stream):
                        # Non-reference frames that are not sampled are never needed by later frames.
                        needed = packet.pts is None or self._pts_to_index.get(packet.pts) in wanted_set
                        codec.skip_frame = "DEFAULT" if needed else "NONREF"
                        for frame in packet.decode():
                            index = self._pts_to_index.get(frame.pts)
                            if index is None:
                                continue
                            position = max(position, index)
                            if index in wanted_set:
                                wanted_set.discard(index)
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
            log.warning("%s: decoding stopped early (%s: %s)", self.path, type(error).__name__, error)
        if wanted_set:
            yield from self._read_with_opencv(sorted(wanted_set))

    def _read_video_in_order(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Decode from the start and number frames as the decoder outputs them (no seeking, no skipping)."""
        import av

        wanted_set, last_wanted = set(wanted), wanted[-1]
        try:
            with av.open(str(self.path)) as container:
                index = -1
                for frame in container.decode(container.streams.video[0]):
                    index += 1
                    if index in wanted_set:
                        wanted_set.discard(index)
                        yield index, to_bgr8(frame.to_ndarray(format="bgr24"), self.path)
                    if index >= last_wanted:
                        break
        except Exception as error:
            log.warning("%s: decoding stopped early (%s: %s)", self.path, type(error).__name__, error)
        if wanted_set:
            yield from self._read_with_opencv(sorted(wanted_set))

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
