"""Faust agents: one per step of a flow, thin, with the science in payloads.

The modules are imported here by name, so that a worker whose agent module
fails to import stops with the error instead of running without those agents
(Faust's autodiscovery only logs such errors).
"""

from dmstream.agents import archiver, ocs, prompt

__all__ = ["archiver", "ocs", "prompt"]
