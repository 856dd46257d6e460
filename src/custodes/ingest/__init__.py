"""Ingest of JSON Lines, JSON arrays and CSV into a vault: streamed, validated, sealed."""

from custodes.ingest.pipeline import IngestReport, IngestTarget, Progress, run_ingest
from custodes.ingest.readers import FORMATS, MAX_RECORD_BYTES

__all__ = ["FORMATS", "MAX_RECORD_BYTES", "IngestReport", "IngestTarget", "Progress", "run_ingest"]
