"""Fabric discovery, validation and tuning.

Topology in, findings and env out: this package imports nothing from
``aitrain.launcher`` or ``aitrain.strategies``.
"""

from aitrain.fabric.findings import Finding, Severity, has_errors, sort_findings

__all__ = ["Finding", "Severity", "has_errors", "sort_findings"]
