"""Preference statistics: value distributions, popular values, adoption and daily rollups, kept from the change feed."""
