"""Monitoring: the request and feedback store the server writes, the detectors that compare what
the served model sees and says with what it was trained on, alerts, the monitoring report, and
feedback harvesting (corrections become a new dataset version).

``tuneline monitor check`` runs :func:`tuneline.monitor.check.run_check`; the detectors' results
are :class:`~tuneline.monitor.results.DetectorResult` rows of a
:class:`~tuneline.monitor.results.CheckResult`. How it fits together: ``docs/monitoring.md``.
"""
