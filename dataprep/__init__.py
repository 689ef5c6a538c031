"""Pure data logic for forgeline: readers, charset handling, extraction, shards and the stage contract.

Nothing in this package imports Ray or Prefect; `workers` and `flows` build on it.
"""
