"""One participant's PCM chunks into fMP4 audio segments: the stream worker of the audio
media kinds (FLAC, Opus)."""

from __future__ import annotations

from typing import Any

from archiver.documents.manifests import AudioManifest, AudioSegmentEntry
from archiver.layout import AUDIO_FORMATS, AudioFormat
from archiver.recovery.spooling import spool_audio_segment
from archiver.segmenting.audio import AudioSegment, AudioSegmenter
from archiver.store.spool import SpooledObject
from archiver.streams.worker import Stream
from archiver.values import MediaMessage


class AudioStream(Stream[AudioSegment, AudioSegmentEntry]):
    """Audio chunks placed on the recording's timeline, in segments behind one init segment."""

    published_counter = "segments"
    has_playlist = True
    spooled_inits: set[str]

    def _begin(
        self, first: MediaMessage, previous: dict[str, Any] | None
    ) -> tuple[AudioManifest, AudioSegmenter]:
        assert self.id.media_format in AUDIO_FORMATS
        codec: AudioFormat = "opus" if self.id.media_format == "opus" else "flac"
        manifest = AudioManifest(self.id, first.context, first.participant, previous)
        settings = self.settings
        segmenter = AudioSegmenter(
            codec,
            settings.audio_segment_s,
            jitter_s=settings.audio_jitter_s,
            drift_s=settings.audio_drift_s,
            fill_s=settings.audio_gap_fill_s,
            max_chunk_s=settings.audio_chunk_max_s,
            first_seq=manifest.next_seq,
            last_sample=manifest.last_sample,
            folder=self.journal_folder,
        )
        self.spooled_inits = set()
        return manifest, segmenter

    async def _spool(self, finished: AudioSegment) -> tuple[AudioSegmentEntry, list[SpooledObject]]:
        init_key = self.id.init_key(finished.init_sha256)
        stored = await spool_audio_segment(
            self.spool,
            self.id,
            finished,
            self.header,
            with_init=init_key not in self.spooled_inits,
        )
        self.spooled_inits.add(init_key)
        return stored
