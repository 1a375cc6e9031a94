"""Upstream registries: the client (auth challenges, tokens, retries), private-image access checks and
their grants, and the verified fetch of a blob."""
