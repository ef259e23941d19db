"""recall-archiver: Recall.ai realtime per-participant video, archived into your own S3."""

__version__ = "0.1.0"
