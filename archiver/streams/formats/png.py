"""PNG frames into tar batches: the stream worker of the png media kind."""

from __future__ import annotations

from typing import Any

from archiver.documents.manifests import PngBatchEntry, PngManifest
from archiver.recovery.spooling import spool_batch
from archiver.segmenting.png import PngBatch, PngBatcher
from archiver.store.spool import SpooledObject
from archiver.streams.worker import Stream
from archiver.values import MediaMessage


class PngStream(Stream[PngBatch, PngBatchEntry]):
    """PNG frames into tar batches."""

    published_counter = "batches"

    def _begin(
        self, first: MediaMessage, previous: dict[str, Any] | None
    ) -> tuple[PngManifest, PngBatcher]:
        manifest = PngManifest(self.id, first.context, first.participant, previous)
        batcher = PngBatcher(
            self.settings.png_batch_frames,
            self.settings.png_batch_s,
            first_seq=manifest.next_seq,
            last_micros=manifest.last_micros,
            max_bytes=self.settings.png_batch_bytes,
        )
        return manifest, batcher

    async def _spool(self, finished: PngBatch) -> tuple[PngBatchEntry, list[SpooledObject]]:
        return await spool_batch(self.spool, self.id, finished, self.header)
