"""AI configuration: configs per scope, the fallback chain, the model catalog, keys, usage and budgets."""
