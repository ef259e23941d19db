"""What the segmenter needs to know about an H.264 access unit, read from its NAL headers.

Only NAL unit types are inspected (start-code scanning, one byte per NAL); the picture
size comes from decoding the key frame once per new configuration, with FFmpeg. Whatever the
bytes, both raise `MediaError` and nothing else, in time bounded by the buffer's size.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from archiver.errors import MediaError
from archiver.segmenting.fragments import avcc

NAL_IDR = 5
NAL_SPS = 7
NAL_PPS = 8
_VCL = frozenset(range(1, 6))
_START = b"\x00\x00\x01"
_LENGTH = struct.Struct(">I")
MAX_NAL_UNITS = 1024
"""More NAL units than any encoder puts in one picture (a slice per macroblock row of a 4K
frame is 135): a buffer of nothing but start codes would otherwise cost seconds of scanning
and hundreds of megabytes of copies."""


@dataclass(frozen=True, slots=True)
class AccessUnit:
    """One access unit as the segmenter sees it."""

    data: bytes
    sample: bytes
    """The unit as an MP4 sample: each NAL unit behind its 4-byte length, as FFmpeg's MP4
    muxer writes it."""
    is_keyframe: bool
    parameter_sets: bytes
    """SPS and PPS NAL units in Annex-B form (empty when the unit carries none)."""
    sps: bytes


def analyse(data: bytes) -> AccessUnit:
    """Classify an Annex-B access unit (key frame when its first slice is IDR) and convert
    it to an MP4 sample in the same scan."""
    if not data.startswith(_START) and not data.startswith(b"\x00" + _START):
        raise MediaError("not_annexb", "access unit does not start with a start code")
    first_slice = 0
    params: list[bytes] = []
    sps = b""
    view = memoryview(data)
    sample: list[bytes | memoryview] = []
    # Regular: every NAL unit starts with a non-zero byte, as encoders write them. Where one
    # does not, the sample follows FFmpeg's rules for where it starts instead (`avcc`).
    regular = True
    pos = data.find(_START)
    units = 0
    while pos >= 0:
        units += 1
        if units > MAX_NAL_UNITS:
            raise MediaError("too_many_nal_units", f"more than {MAX_NAL_UNITS} NAL units")
        begin = pos + 3
        nxt = data.find(_START, begin)
        if begin >= len(data):
            break
        regular = regular and data[begin] != 0
        if regular:
            # The NAL unit ends where the next start code begins, a zero before it included.
            end = len(data) if nxt < 0 else nxt - 1 if nxt > begin and not data[nxt - 1] else nxt
            sample += (_LENGTH.pack(end - begin), view[begin:end])
        nal_type = data[begin] & 0x1F
        if nal_type in (NAL_SPS, NAL_PPS):
            end = len(data) if nxt < 0 else nxt
            nal = data[begin:end].rstrip(b"\x00")
            params.append(b"\x00\x00\x00\x01" + nal)
            if nal_type == NAL_SPS and not sps:
                sps = nal
        elif nal_type in _VCL and not first_slice:
            first_slice = nal_type
        pos = nxt
    if not first_slice:
        raise MediaError("no_slice", "access unit carries no picture slice")
    return AccessUnit(
        data=data,
        sample=b"".join(sample) if regular else avcc(data),
        is_keyframe=first_slice == NAL_IDR,
        parameter_sets=b"".join(params),
        sps=sps,
    )


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """One SPS/PPS configuration: what an init segment describes."""

    parameter_sets: bytes
    width: int
    height: int
    codec: str
    """RFC 6381 codec string, e.g. avc1.42E01F."""

    def as_record(self) -> dict[str, Any]:
        """JSON-safe form, for the journal."""
        return {
            "parameter_sets": base64.b64encode(self.parameter_sets).decode(),
            "width": self.width,
            "height": self.height,
            "codec": self.codec,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> StreamConfig:
        return cls(
            parameter_sets=base64.b64decode(record["parameter_sets"]),
            width=record["width"],
            height=record["height"],
            codec=record["codec"],
        )


def probe_config(keyframe: AccessUnit) -> StreamConfig:
    """Read the configuration a key frame starts: codec string from the SPS, size by decoding."""
    sps = keyframe.sps
    if len(sps) < 4:
        raise MediaError("no_parameter_sets", "key frame without a usable SPS")
    codec = f"avc1.{sps[1]:02X}{sps[2]:02X}{sps[3]:02X}"
    try:
        width, height = _decoded_size(keyframe.data)
    except MediaError:
        raise
    except Exception as exc:
        # FFmpeg is decoding the sender's bytes: whatever PyAV raises for them is theirs.
        raise MediaError("undecodable_keyframe", f"{type(exc).__name__}: {exc}") from exc
    if width <= 0 or height <= 0:
        raise MediaError("undecodable_keyframe", f"decoded to an empty picture {width}x{height}")
    return StreamConfig(
        parameter_sets=keyframe.parameter_sets,
        width=width,
        height=height,
        codec=codec,
    )


def _decoded_size(data: bytes) -> tuple[int, int]:
    """Decode one access unit on the calling thread; the size of its first picture."""
    decoder = av.CodecContext.create("h264", "r")
    decoder.thread_count = 1
    packet = av.Packet(data)
    packet.pts = packet.dts = 0
    packet.time_base = Fraction(1, 90000)
    frames = list(decoder.decode(packet)) or list(decoder.decode(None))
    if not frames:
        raise MediaError("undecodable_keyframe", "the decoder returned no picture")
    return frames[0].width, frames[0].height
