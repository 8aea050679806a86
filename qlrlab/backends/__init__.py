"""Shared curvature machinery used by several components (K-FAC factor capture, BackPACK twin)."""
