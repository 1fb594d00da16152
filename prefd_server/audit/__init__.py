"""Audit: change history, diffs, rollback, and export and erasure of a user's data."""
