"""Bulk exports and leak tracing: what an export holds of a record (pseudonymise), how it
is sealed to its recipient (envelope), its fingerprints (canaries), the two-person
request it needs (requests) and the matching of a leaked sample back to it (trace).

`envelope` needs nothing of the vault: a recipient opens an export with it alone.
"""
