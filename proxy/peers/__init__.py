"""Other nodes' proxies: asking them for blobs, discovering them from a Service, and the runtime's
fallback list (hosts.toml)."""
