"""HLS playlists of H.264 and audio streams: a pure function of a stream's manifest
document; and each participant's multivariant playlist, of what the session index lists.

`playlist.m3u8` sits beside `manifest.json` and names the same objects with URIs relative to
itself, so it plays from any copy of the stream's folder (a bucket, a local folder, a CDN).
Each init segment is announced with `#EXT-X-MAP`; where the configuration changes or the
timeline jumps (a pause, a loss) before a key frame, `#EXT-X-DISCONTINUITY` tells the player
to reset its decoder and timestamps. A segment that begins mid-GOP (a stream continued on
another worker or task) never gets one behind a segment of its configuration: a reset
decoder would drop its frames until the next key frame, while across a jump players go on
decoding (hls.js closes the jump up; FFmpeg keeps the timestamps). Every segment carries
`#EXT-X-PROGRAM-DATE-TIME` (the source's wall clock at its first frame), so players and
tools can line streams up with each other and with the events. A live stream's playlist is
an `EVENT` playlist that only grows; once the stream is complete it ends with
`#EXT-X-ENDLIST`. Audio segments all start a decode of their own: a discontinuity marks
only where the timeline jumps (nothing was received for longer than is filled in).

`participants/{participant}/playlist.m3u8` plays a participant as one presentation: their
webcam's playlist as the variant, their audio as its `AUDIO` rendition (or the audio alone,
for a participant who sent no video). Both are on the recording's timeline, so players line
them up by their timestamps.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

PLAYLIST_NAME = "playlist.m3u8"
CONTENT_TYPE = "application/vnd.apple.mpegurl"
HLS_VERSION = 7
"""fMP4 segments with `#EXT-X-MAP` outside an I-frames-only playlist need version 6; 7 is
what players expect of CMAF."""
CONTINUITY_TOLERANCE_S = 0.0001
"""Segment times are rounded to microseconds; abutting segments agree to within this."""


def _relative_to(base: str, key: str) -> str:
    """`key` as a URI relative to the folder `base` (both object keys)."""
    if base and key.startswith(base + "/"):
        return key[len(base) + 1 :]
    return key


def _program_date_time(wallclock: str) -> str:
    """ISO 8601 with milliseconds and an explicit offset, as HLS asks."""
    moment = datetime.fromisoformat(wallclock)
    return moment.isoformat(timespec="milliseconds")


def discontinuous(previous: dict[str, Any], segment: dict[str, Any]) -> bool:
    """Whether a player must reset between two listed segments: a new configuration (init
    segment), or a timeline that does not continue where the previous segment ended unless
    the segment needs the previous one's pictures to decode."""
    if segment["init_key"] != previous["init_key"]:
        return True
    if segment.get("starts_with_keyframe") is False:
        return False
    return bool(abs(segment["start"] - previous["end"]) > CONTINUITY_TOLERANCE_S)


def render_playlist(manifest: dict[str, Any]) -> str:
    """The HLS media playlist of an H.264 stream's manifest document (`segments` and
    `status` are all it reads)."""
    segments: list[dict[str, Any]] = manifest.get("segments", [])
    base = segments[0]["init_key"].rpartition("/")[0] if segments else ""
    longest = max((s["end"] - s["start"] for s in segments), default=0.0)
    lines = [
        "#EXTM3U",
        f"#EXT-X-VERSION:{HLS_VERSION}",
        f"#EXT-X-TARGETDURATION:{max(1, math.ceil(longest - CONTINUITY_TOLERANCE_S))}",
        "#EXT-X-PLAYLIST-TYPE:EVENT",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-DISCONTINUITY-SEQUENCE:0",
    ]
    previous: dict[str, Any] | None = None
    for segment in segments:
        if previous is not None and discontinuous(previous, segment):
            lines.append("#EXT-X-DISCONTINUITY")
        if previous is None or segment["init_key"] != previous["init_key"]:
            lines.append(f'#EXT-X-MAP:URI="{_relative_to(base, segment["init_key"])}"')
        lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_program_date_time(segment['start_wallclock'])}")
        lines.append(f"#EXTINF:{segment['end'] - segment['start']:.6f},")
        lines.append(_relative_to(base, segment["key"]))
        previous = segment
    if manifest.get("status") == "complete":
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


AUDIO_GROUP = "voice"
_NOMINAL_BANDWIDTH = {"video": 2_000_000, "audio": 300_000}
"""`BANDWIDTH` is required; these stand for a 720p webcam and 16 kHz FLAC, as the archive
holds no bit rates."""


def participant_streams(session: dict[str, Any], participant_id: str) -> list[dict[str, Any]]:
    """One participant's entries in a stored session index."""
    streams = session.get("streams")
    if not isinstance(streams, list):
        return []
    return [
        stream
        for stream in streams
        if isinstance(stream, dict) and str(stream.get("participant_id")) == participant_id
    ]


def render_participant_playlist(
    participant_folder: str, streams: list[dict[str, Any]]
) -> str | None:
    """The multivariant playlist of one participant from their session index entries
    (`type`, `format`, `playlist_key`): None when they have neither a webcam nor audio."""
    video = next(
        (
            s
            for s in streams
            if s.get("type") == "webcam"
            and s.get("format") == "h264"
            and isinstance(s.get("playlist_key"), str)
        ),
        None,
    )
    audio = next(
        (s for s in streams if s.get("type") == "audio" and isinstance(s.get("playlist_key"), str)),
        None,
    )
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{HLS_VERSION}", "#EXT-X-INDEPENDENT-SEGMENTS"]
    if video is None and audio is None:
        return None
    if video is None:
        assert audio is not None
        lines.append(f"#EXT-X-STREAM-INF:BANDWIDTH={_NOMINAL_BANDWIDTH['audio']}")
        lines.append(_relative_to(participant_folder, audio["playlist_key"]))
        return "\n".join(lines) + "\n"
    bandwidth = _NOMINAL_BANDWIDTH["video"]
    variant = f"#EXT-X-STREAM-INF:BANDWIDTH={bandwidth}"
    if audio is not None:
        uri = _relative_to(participant_folder, audio["playlist_key"])
        lines.append(
            f'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="{AUDIO_GROUP}",NAME="voice",'
            f'DEFAULT=YES,AUTOSELECT=YES,URI="{uri}"'
        )
        variant = f"#EXT-X-STREAM-INF:BANDWIDTH={bandwidth + _NOMINAL_BANDWIDTH['audio']}"
        variant += f',AUDIO="{AUDIO_GROUP}"'
    lines.append(variant)
    lines.append(_relative_to(participant_folder, video["playlist_key"]))
    return "\n".join(lines) + "\n"
