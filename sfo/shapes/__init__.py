"""The shapes world: an embedded default where subject fidelity is measured exactly (issue 6)."""
