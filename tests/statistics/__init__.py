"""Tests of the statistics domain."""
