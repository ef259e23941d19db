"""The JSON documents and their rules: stream and events manifests, and the HLS playlist
rendered from a manifest."""
