"""The node agent (docs/DESIGN.md, "Control plane"): runs in the proxy's gunicorn master with
`--node-name`, watches that node's NodeImage, pulls its tasks through this proxy and reports status."""
