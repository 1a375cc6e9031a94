"""The node agent (docs/DESIGN.md, "Control plane"): with `imagewarm proxy --node-name N`, one
process per node started by the proxy's gunicorn master watches NodeImage N, pulls its tasks
through this proxy and reports their status."""
