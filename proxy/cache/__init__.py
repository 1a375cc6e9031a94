"""The content-addressed cache on disk: blobs, manifests and tags, verified before they are visible,
filled once across processes, pinned and evicted. It imports nothing else of the proxy."""
