"""Turning a stream's media into archive objects: H.264 into fMP4 segments, PNG into tar
batches."""
