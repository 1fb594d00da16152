"""Preferences: definitions, overrides at GLOBAL, ORG and USER scope, and effective values."""
