"""Ray Serve application (issue #4; not built yet)."""
