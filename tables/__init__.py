"""Faust tables: the state of dmstream's agents, changelogged to Kafka.

Each table is partitioned like the topic that feeds it, so a worker holds the
state of exactly the partitions it consumes, and a restarted worker recovers
it from the changelog.
"""
