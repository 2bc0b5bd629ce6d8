"""Batch Processing: jobs over archived data in the Data Backbone (calibration products, templates).

Jobs call the same payloads as the streams; they read and write the Data
Backbone and are started from the CLI or, later, by the OCS.
"""
