"""Small programs that use callbridge the way an app does (through its public contracts only)."""
