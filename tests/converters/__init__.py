"""Converters written for the conformance tests (``crossval conformance --converter``)."""
