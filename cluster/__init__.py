"""Reaching a cluster: a local Ray head (``local``), job submission (``submit``, ``chain``), and the storage
every stage and the Serve app read and write through (``storage``: local paths, ``s3://``, ``gs://``)."""
