"""Faust agents: one per step of a flow, thin, with the science in payloads.

Faust imports every module of this package when a worker starts.
"""
