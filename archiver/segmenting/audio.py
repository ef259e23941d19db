"""One participant's PCM chunks placed on the recording's timeline and encoded into fMP4.

Recall sends each participant's audio as chunks of mono 16-bit PCM at 16 kHz, each stamped
with the sender's relative time. The segmenter keeps a sample clock: where the next chunk
should start if audio is continuous. A chunk stamped within `jitter_s` of it is joined
sample for sample (jitter never adds or drops a sample); one stamped later is a gap, filled
with silence up to `fill_s` inside the segment, else the segment closes and the next one
starts at the new time; one stamped earlier overlaps what is stored, and the overlap is cut
from it. A sender clock that runs fast or slow shows as a slowly growing difference between
timestamps and the clock: once its smoothed value passes `drift_s`, the clock is moved by it
(silence added, or samples cut) and the adjustment listed. Every sample's place is thus
within `drift_s` plus the jitter of its timestamp.

Each segment is encoded by an encoder of its own (FLAC or Opus), whole chunks only, so that
a journal file replays into the same segment; its fragments are written as the H.264
segmenter writes them, behind one init segment per codec.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
from av.audio.codeccontext import AudioCodecContext
from av.audio.stream import AudioStream

from archiver.errors import MediaError, SegmenterFailure
from archiver.layout import AudioFormat
from archiver.segmenting.base import DropCounters, SegmentJournal
from archiver.segmenting.fragments import Fragment, SegmentBody

SAMPLE_RATE = 16_000
BYTES_PER_SAMPLE = 2
FRAGMENT_SAMPLES = 5 * SAMPLE_RATE
"""A fragment is written through to its file every five seconds of audio."""
MAX_SAMPLES = 10**13 - 1
"""Thirteen digits of samples in segment names: nineteen years at 16 kHz."""
_TIME_BASE = Fraction(1, SAMPLE_RATE)
_ENCODERS: dict[AudioFormat, str] = {"flac": "flac", "opus": "libopus"}
_OPUS_BIT_RATE = 32_000
_DRIFT_SMOOTHING = 1 / 32
"""Weight of each chunk's difference in the smoothed one: jitter of a few milliseconds
averages out, a drift of 200 ppm (0.2 ms a second) shows within seconds."""
_SETTLING_CHUNKS = 128
"""Chunks after an anchor whose mean difference is the reference a drift is measured from:
the anchor chunk's own jitter is a constant offset, not a drift to correct (that would
drop or add samples for jitter)."""
MAX_ADJUSTMENTS = 1000
"""Adjustments a segment lists one by one; beyond, they are only counted."""
_MUXER_OPTIONS = {
    "movflags": "frag_keyframe+empty_moov+default_base_moof",
    "use_editlist": "0",
    "avoid_negative_ts": "disabled",
}


def segment_name(start_sample: int) -> str:
    """An audio segment's name: its first sample's place on the timeline, zero-padded."""
    return f"{start_sample:013d}"


def seconds(samples: int) -> float:
    return round(samples / SAMPLE_RATE, 6)


@dataclass(frozen=True, slots=True)
class AudioSegment:
    """A finished audio segment and its init segment, ready to store."""

    seq: int
    codec: AudioFormat
    start_sample: int
    end_sample: int
    """One past the last sample."""
    start_wallclock: datetime
    chunks: int
    silence_samples: int
    """Samples of silence stored for gaps and adjustments."""
    trimmed_samples: int
    """Samples received and not stored: overlaps and adjustments."""
    worst_placement_s: float
    """The largest distance between a chunk's timestamp and where it was placed."""
    adjustments: tuple[dict[str, Any], ...]
    init: bytes
    init_sha256: str
    size: int
    sha256: str
    body_path: Path | None
    body_data: bytes | None

    @property
    def body(self) -> bytes:
        if self.body_data is not None:
            return self.body_data
        assert self.body_path is not None
        return self.body_path.read_bytes()

    @property
    def name(self) -> str:
        return segment_name(self.start_sample)

    @property
    def frame_count(self) -> int:
        return self.chunks


@dataclass(slots=True)
class AudioCounters(DropCounters):
    """What the audio segmenter did with the chunks it was given."""

    gaps_filled: int = 0
    silence_samples: int = 0
    overlaps_trimmed: int = 0
    trimmed_samples: int = 0
    drift_adjustments: int = 0


def init_segment(codec: AudioFormat) -> bytes:
    """The init segment of a codec's track, from FFmpeg's MP4 muxer (header only), with
    the header an encoder of that codec gives its stream."""
    encoder = _encoder(codec)
    buffer = io.BytesIO()
    try:
        container = av.open(buffer, "w", format="mp4", options=_MUXER_OPTIONS)
        stream = cast(AudioStream, container.add_stream(_ENCODERS[codec], rate=SAMPLE_RATE))
        stream.codec_context.layout = "mono"
        stream.codec_context.format = "s16"
        stream.codec_context.extradata = encoder.extradata
        stream.time_base = _TIME_BASE
        container.start_encoding()
        container.close()
    except av.FFmpegError as exc:
        raise MediaError("mux_failed", str(exc)) from exc
    return buffer.getvalue()


def _encoder(codec: AudioFormat) -> AudioCodecContext:
    context = cast(AudioCodecContext, av.CodecContext.create(_ENCODERS[codec], "w"))
    context.sample_rate = SAMPLE_RATE
    context.layout = "mono"
    context.format = "s16"
    context.time_base = _TIME_BASE
    if codec == "opus":
        context.bit_rate = _OPUS_BIT_RATE
    context.open()
    return context


def _encoder_delay(codec: AudioFormat, header: bytes | None) -> int:
    """Samples (at 16 kHz) an encoder puts before the first one it was given: Opus's
    pre-skip, which its header gives at 48 kHz (RFC 7845 5.1); none for FLAC."""
    if codec != "opus" or header is None or len(header) < 12:
        return 0
    return int.from_bytes(header[10:12], "little") * SAMPLE_RATE // 48_000


class _Encoding:
    """One segment's encoder and the fragments it has made so far."""

    def __init__(self, codec: AudioFormat, start: int, sequence: int, path: Path | None) -> None:
        self.encoder = _encoder(codec)
        self.frame_size: int = self.encoder.frame_size or 1152
        delay = _encoder_delay(codec, self.encoder.extradata)
        self.start = max(0, start - delay)
        """Where the first packet's samples go: before the segment's first sample by the
        encoder's delay, which decoders skip (Opus's pre-skip), so that sample 0 of the
        segment plays at its place."""
        self.fed = 0
        """Samples handed to the encoder."""
        self.encoded = 0
        """Samples in the packets made so far."""
        self.leftover = b""
        """Less than a frame of PCM, waiting for the next chunk."""
        self.body = SegmentBody(path)
        self.fragment = Fragment(sequence=sequence, decode_time=self.start)
        self.fragment_samples = 0

    def feed(self, pcm: bytes) -> None:
        data = self.leftover + pcm if self.leftover else pcm
        frame_bytes = self.frame_size * BYTES_PER_SAMPLE
        whole = len(data) - len(data) % frame_bytes
        for offset in range(0, whole, frame_bytes):
            self._encode(data[offset : offset + frame_bytes])
        self.leftover = data[whole:]

    def finish(self) -> SegmentBody:
        if self.leftover:
            self._encode(self.leftover)
            self.leftover = b""
        self._take(self.encoder.encode(None))
        if self.fragment.table:
            self.body.write(self.fragment.to_bytes())
        self.body.finish()
        return self.body

    def _encode(self, pcm: bytes) -> None:
        samples = len(pcm) // BYTES_PER_SAMPLE
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
        frame.planes[0].update(pcm)
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = _TIME_BASE
        frame.pts = self.fed
        self.fed += samples
        self._take(self.encoder.encode(frame))

    def _take(self, packets: list[Any]) -> None:
        for packet in packets:
            if not packet.size:
                continue  # FLAC's closing packet carries only its updated header
            duration = int(packet.duration or self.frame_size)
            self.fragment.add(bytes(packet), duration, True)
            self.encoded += duration
            self.fragment_samples += duration
            if self.fragment_samples >= FRAGMENT_SAMPLES:
                self.body.write(self.fragment.to_bytes())
                self.fragment = Fragment(
                    sequence=self.fragment.sequence + 1, decode_time=self.start + self.encoded
                )
                self.fragment_samples = 0


@dataclass(slots=True)
class _Open:
    """The segment being filled."""

    start: int
    wallclock: datetime
    encoding: _Encoding
    end: int
    """The sample clock: where the next chunk continues."""
    chunks: int = 0
    silence: int = 0
    trimmed: int = 0
    worst_s: float = 0.0
    adjustments: list[dict[str, Any]] = field(default_factory=list)


class AudioSegmenter:
    """Places one participant's chunks on the timeline and cuts them into segments; owned
    by a single worker, never shared."""

    def __init__(
        self,
        codec: AudioFormat,
        segment_s: float,
        *,
        jitter_s: float = 0.06,
        drift_s: float = 0.01,
        fill_s: float = 10.0,
        max_chunk_s: float = 2.0,
        first_seq: int = 0,
        last_sample: int = -1,
        folder: Path | None = None,
        journal: SegmentJournal | None = None,
    ) -> None:
        self.codec: AudioFormat = codec
        self.segment_samples = max(1, round(segment_s * SAMPLE_RATE))
        self.jitter = round(jitter_s * SAMPLE_RATE)
        self.drift = max(1, round(drift_s * SAMPLE_RATE))
        self.fill = round(fill_s * SAMPLE_RATE)
        self.max_chunk_bytes = round(max_chunk_s * SAMPLE_RATE) * BYTES_PER_SAMPLE
        self.folder = folder
        self.journal = journal
        self.counters = AudioCounters()
        self.gaps: list[dict[str, Any]] = []
        self._next_seq = first_seq
        self._clock = last_sample + 1 if last_sample >= 0 else None
        """The end of what is stored or open: no chunk is placed before it."""
        self._smoothed = 0.0
        self._reference = 0.0
        self._settled = 0
        """Chunks joined since the clock was last anchored."""
        self._open: _Open | None = None
        self._init: bytes | None = None
        self._init_sha256 = ""

    @property
    def held_frames(self) -> int:
        return self._open.chunks if self._open is not None else 0

    def snapshot(self) -> dict[str, int]:
        return self.counters.snapshot()

    def reject(self, reason: str) -> None:
        self.counters.drop(reason)

    def push(self, data: bytes, relative_s: float, absolute: datetime) -> list[AudioSegment]:
        """Place one chunk; return the segments it closed."""
        try:
            at = self._check(data, relative_s)
        except MediaError as exc:
            self.reject(exc.reason)
            raise
        try:
            return self._place(data, at, absolute)
        except MediaError:
            raise  # counted where it was found
        except Exception as exc:  # any failure of ours costs this chunk and the open segment
            raise SegmenterFailure(repr(exc), self._salvage(at)) from exc

    def _check(self, data: bytes, relative_s: float) -> int:
        if not data:
            raise MediaError("empty_audio", "a chunk with no samples")
        if len(data) % BYTES_PER_SAMPLE:
            raise MediaError("odd_audio_bytes", f"{len(data)} bytes is not whole 16-bit samples")
        if len(data) > self.max_chunk_bytes:
            raise MediaError(
                "audio_chunk_too_large", f"{len(data)} bytes, over {self.max_chunk_bytes}"
            )
        if not 0 <= relative_s <= MAX_SAMPLES / SAMPLE_RATE:  # also false for NaN
            raise MediaError("timestamp", f"relative {relative_s!r} out of range")
        return round(relative_s * SAMPLE_RATE)

    def _place(self, data: bytes, at: int, absolute: datetime) -> list[AudioSegment]:
        closed: list[AudioSegment] = []
        segment = self._open
        if segment is not None and segment.end - segment.start >= self.segment_samples:
            closed.append(self._close())
            segment = None
        clock = self._clock if segment is None else segment.end
        offset = 0 if clock is None else at - clock
        silence = trim = 0
        adjustment: dict[str, Any] | None = None
        if clock is None:
            place = at  # the first chunk anchors the clock
            self._settled, self._reference = 0, 0.0
        elif abs(offset - round(self._reference)) <= self.jitter:
            place = clock
            step = self._follow(offset)
            if step:
                silence, trim = max(0, step), max(0, -step)
                adjustment = {"at": seconds(clock), "samples": step, "reason": "drift"}
                self.counters.drift_adjustments += 1
        elif offset > 0:
            # Nothing received for a while: a gap, as silence when short, else a new segment.
            self.gaps.append(
                {
                    "start": seconds(clock),
                    "end": seconds(at),
                    "reason": "not_received",
                    "filled": offset <= self.fill,
                }
            )
            self._settled, self._reference = 0, 0.0
            if offset <= self.fill:
                place, silence = clock, offset
                self.counters.gaps_filled += 1
            else:
                if segment is not None:
                    closed.append(self._close())
                segment, place = None, at
        else:
            # Stamped before the end of what is stored: the overlap is cut, the rest joins.
            place, trim = clock, -offset
            self.counters.overlaps_trimmed += 1
            self.gaps.append({"start": seconds(at), "end": seconds(clock), "reason": "overlap"})
            self._settled, self._reference = 0, 0.0
        samples = len(data) // BYTES_PER_SAMPLE
        if trim >= samples:
            self.counters.trimmed_samples += samples
            self.reject("audio_overlap")
            raise MediaError("audio_overlap", "every sample of the chunk is already stored")
        pcm = bytes(silence * BYTES_PER_SAMPLE) + data[trim * BYTES_PER_SAMPLE :]
        if segment is None:
            segment = self._start(place, absolute)
        self._append(segment, pcm, at, place + silence - trim, silence, trim, absolute)
        if adjustment is not None and len(segment.adjustments) < MAX_ADJUSTMENTS:
            segment.adjustments.append(adjustment)
        return closed

    def _follow(self, offset: int) -> int:
        """Take in one joined chunk's difference from the clock; return by how many samples
        to move the clock (0: none). The mean difference of the chunks after an anchor is
        the reference; the smoothed difference moving `drift` away from it is a drift."""
        self._settled += 1
        if self._settled <= _SETTLING_CHUNKS:
            self._smoothed += (offset - self._smoothed) / self._settled
            self._reference = self._smoothed
            return 0
        self._smoothed += (offset - self._smoothed) * _DRIFT_SMOOTHING
        if abs(self._smoothed - self._reference) < self.drift:
            return 0
        step = round(self._smoothed - self._reference)
        self._smoothed -= step
        return step

    def _start(self, place: int, absolute: datetime) -> _Open:
        if self._init is None:
            self._init = init_segment(self.codec)
            self._init_sha256 = hashlib.sha256(self._init).hexdigest()
        name = segment_name(place)
        path = None if self.folder is None else self.folder / f"{name}.mp4"
        encoding = _Encoding(self.codec, place, self._next_seq + 1, path)
        if self.journal is not None:
            self.journal.begin(name, {"codec": self.codec})
        self._open = _Open(place, absolute, encoding, end=place)
        return self._open

    def _append(
        self,
        segment: _Open,
        pcm: bytes,
        at: int,
        placed: int,
        silence: int,
        trim: int,
        absolute: datetime,
    ) -> None:
        """Encode the placed samples; the journal keeps them as placed (silence included,
        overlap cut), so that a replay joins them the same way."""
        start = segment.end
        segment.encoding.feed(pcm)
        segment.end += len(pcm) // BYTES_PER_SAMPLE
        segment.chunks += 1
        segment.silence += silence
        segment.trimmed += trim
        segment.worst_s = max(segment.worst_s, abs(placed - at) / SAMPLE_RATE)
        self.counters.silence_samples += silence
        self.counters.trimmed_samples += trim
        self._clock = segment.end
        if self.journal is not None:
            when = absolute + timedelta(seconds=(start - at) / SAMPLE_RATE) if silence else absolute
            self.journal.record(start / SAMPLE_RATE, when, pcm)

    def flush(self) -> list[AudioSegment]:
        return [self._close()] if self._open is not None else []

    def _close(self) -> AudioSegment:
        segment = self._open
        assert segment is not None
        assert self._init is not None
        self._open = None
        body = segment.encoding.finish()
        finished = AudioSegment(
            seq=self._next_seq,
            codec=self.codec,
            start_sample=segment.start,
            end_sample=segment.end,
            start_wallclock=segment.wallclock,
            chunks=segment.chunks,
            silence_samples=segment.silence,
            trimmed_samples=segment.trimmed,
            worst_placement_s=round(segment.worst_s, 6),
            adjustments=tuple(segment.adjustments),
            init=self._init,
            init_sha256=self._init_sha256,
            size=body.size,
            sha256=body.sha256,
            body_path=body.path,
            body_data=body.data,
        )
        self._next_seq += 1
        return finished

    def _salvage(self, at: int) -> list[AudioSegment]:
        """After a failure of ours: what the open segment held is closed if it can be (its
        chunks are published), else counted as dropped; the failed chunk is dropped."""
        self.counters.drop("segmenter_error")
        self.counters.segmenter_resets += 1
        salvaged: list[AudioSegment] = []
        if self._open is not None:
            chunks = self._open.chunks
            try:
                salvaged.append(self._close())
            except Exception:  # noqa: BLE001 (the segment is lost; say how many chunks)
                self.counters.drop("segmenter_error", chunks)
                self._open = None
        self.gaps.append({"start": seconds(at), "end": seconds(at), "reason": "segmenter_error"})
        return salvaged
