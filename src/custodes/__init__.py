"""custodes: a vault for personal records on a whole population.

Every personal field is encrypted under keys held apart from the data, found through
keyed blind indexes, and read only through one access function that records who
asked and why.
"""

__version__ = "0.1.0"
