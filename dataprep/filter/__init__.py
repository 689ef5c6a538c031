"""Filter logic: the rule chain, heuristic rules, fastText models, the funnel, training data."""
