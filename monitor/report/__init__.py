"""`monitor report`: a self-contained audit report of what is watched, how, and how well.

Composes the configuration, the detector packs, the probes' provenance, `monitor eval`'s figures and,
when given its URL, Prometheus's record of firing and drift, into one HTML file (and a PDF when
Chromium is installed) that a reviewer or regulator can read without the monitor.
"""


class ReportError(Exception):
    """A report input that cannot be used (unreachable Prometheus, a bad window); the message says which."""
