"""Notification decisions: channels, quiet hours, digests, conditions, throttles and the consent ledger."""
