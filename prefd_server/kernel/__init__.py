"""Domain-free building blocks every domain shares: ids, errors, the pool, the change feed, caches."""
