"""dmstream: the LSST Data Management System as a reactive streaming system."""

__version__ = "0.1.0"
