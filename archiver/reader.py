"""The reader API: open an archive by its store URL, list recordings and streams, and read
a stream's decoded frames between two times (see `archiver.consumers.reader`)."""

from archiver.consumers.reader import Archive, Frame, StreamInfo

__all__ = ["Archive", "Frame", "StreamInfo"]
