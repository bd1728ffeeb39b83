"""The on-disk format: target, chain directories, manifests, checksums, qcow2 headers, file primitives."""
